"""FlowTiTok, the 1-D image tokenizer (spec section 5): pixels <-> 77 x 16 latent tokens.

Transformer blocks are pre-LN with SwiGLU MLPs; the 2-D RoPE rotates q and k of the g*g
patch (or mask) tokens only. Parameter names follow the published `FlowTiTok_*.bin`.
"""
from __future__ import annotations

import torch
from torch import nn

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS, TokenizerConfig
from flowtok_fast.models.generator import Attention
from flowtok_fast.models.latent_norm import LatentNorm, posterior_latents
from flowtok_fast.models.rope import rope_2d_tables
from flowtok_fast.ops import UsesOps, use


class SwiGLU(UsesOps, nn.Module):
    def __init__(self, width: int):
        super().__init__()
        hidden = TokenizerConfig.swiglu_hidden(width)
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.swiglu_linear(self.w12(x), self.w3)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = SwiGLU(width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class Rope2D(nn.Module):
    """Holds the cos/sin tables as persistent buffers, as the checkpoints do (so a 512 px
    checkpoint, with [1024, 64] tables, does not load into a 256 px model)."""

    def __init__(self, grid: int, head_dim: int):
        super().__init__()
        cos, sin = rope_2d_tables(grid, head_dim)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.freqs_cos, self.freqs_sin


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TokenizerEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        w, g = cfg.encoder_width, cfg.grid
        self.cfg = cfg
        self.latent_token_positional_embedding = nn.Parameter(torch.randn(NUM_TOKENS, w) * w**-0.5)
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.positional_embedding = Rope2D(g, w // cfg.encoder_heads)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(Block(w, cfg.encoder_heads) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(w)
        self.conv_out = nn.Conv2d(w, 2 * TOKEN_CHANNELS, 1)

    def forward(self, pixels: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] -> posterior parameters [B, 32, 1, 77]."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, g*g, w], row-major patches
        latents = (latent_tokens + self.latent_token_positional_embedding).to(x.dtype)
        x = torch.cat([x, latents.expand(x.shape[0], -1, -1)], dim=1)
        x = self.ln_pre(x)
        rope = self.positional_embedding.tables()
        for block in self.transformer:
            x = block(x, rope)
        x = self.ln_post(x[:, -NUM_TOKENS:])
        return self.conv_out(x.transpose(1, 2).unsqueeze(2))  # [B, w, 1, 77] -> [B, 32, 1, 77]


class DepthToSpace(nn.Module):
    """'b (p1 p2 c) h w -> b c (h p1) (w p2)'."""

    def __init__(self, patch: int):
        super().__init__()
        self.p = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.p
        x = x.view(b, p, p, 3, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, 3, h * p, w * p)


class TokenizerDecoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        w, g = cfg.decoder_width, cfg.grid
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.randn(1, 1, w) * w**-0.5)
        self.latent_token_positional_embedding = nn.Parameter(torch.randn(NUM_TOKENS, w) * w**-0.5)
        self.text_guidance_positional_embedding = nn.Parameter(torch.randn(NUM_TOKENS, w) * w**-0.5)
        self.decoder_embed = nn.Linear(TOKEN_CHANNELS, w)
        self.positional_embedding = Rope2D(g, w // cfg.decoder_heads)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(Block(w, cfg.decoder_heads) for _ in range(cfg.decoder_layers))
        self.ln_post = nn.LayerNorm(w)
        self.ffn = nn.Sequential(nn.Conv2d(w, cfg.patch_size**2 * 3, 1), DepthToSpace(cfg.patch_size))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        self.text_guidance_proj = nn.Linear(cfg.text_width, w)

    def forward(self, z: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """z [B,16,1,77] (posterior space), CLIP features [B,77,768] -> pixels [B,3,H,W] (unclamped)."""
        b, g = z.shape[0], self.cfg.grid
        latents = self.decoder_embed(z.flatten(2).transpose(1, 2)) + self.latent_token_positional_embedding
        text = self.text_guidance_proj(text_feats) + self.text_guidance_positional_embedding
        masks = self.mask_token.expand(b, g * g, -1).to(latents.dtype)
        x = torch.cat([masks, latents, text.to(latents.dtype)], dim=1)  # [B, g*g + 154, w]
        x = self.ln_pre(x)
        rope = self.positional_embedding.tables()
        for block in self.transformer:
            x = block(x, rope)
        x = self.ln_post(x[:, : g * g])
        x = x.transpose(1, 2).reshape(b, -1, g, g)
        return self.conv_out(self.ffn(x))


class FlowTiTok(nn.Module):
    """Encoder + decoder; `latent_tokens` sits at the top level as in the checkpoints."""

    def __init__(self, cfg: TokenizerConfig = TokenizerConfig(), with_encoder: bool = True, use_fused_kernels: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.encoder_width
        if with_encoder:
            self.latent_tokens = nn.Parameter(torch.randn(NUM_TOKENS, w) * w**-0.5)
            self.encoder = TokenizerEncoder(cfg)
        self.decoder = TokenizerDecoder(cfg)
        self.latent_norm = LatentNorm()  # posterior <-> flow space (the reference: x 1.0143)
        _init_weights(self)
        use(self, "triton" if use_fused_kernels else "reference")

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "encoder")

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] -> flow-space latents [B, 77, 16]: a posterior sample (or the mean)
        through `latent_norm` (the reference: times 1.0143)."""
        if not self.has_encoder:
            raise RuntimeError("this tokenizer was built without its encoder (decode-only)")
        r = self.cfg.resolution
        if pixels.dim() != 4 or pixels.shape[1:] != (3, r, r):
            raise ValueError(f"pixels must be [B, 3, {r}, {r}] in [0, 1], got {tuple(pixels.shape)}")
        z = posterior_latents(self.encoder(pixels, self.latent_tokens), sample, generator)
        return self.latent_norm.to_flow(z)  # [B,16,1,77] -> [B,77,16]

    def decode(self, latents: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """flow-space latents [B,77,16] + CLIP features [B,77,768] -> images [B,3,H,W] in [0,1]."""
        if latents.dim() != 3 or latents.shape[1:] != (NUM_TOKENS, TOKEN_CHANNELS):
            raise ValueError(f"latents must be [B, {NUM_TOKENS}, {TOKEN_CHANNELS}], got {tuple(latents.shape)}")
        if text_feats.dim() != 3 or text_feats.shape[:2] != (latents.shape[0], NUM_TOKENS):
            raise ValueError(
                f"text features must be [{latents.shape[0]}, {NUM_TOKENS}, {self.cfg.text_width}], got {tuple(text_feats.shape)}"
            )
        z = self.latent_norm.from_flow(latents.float()).to(latents.dtype)  # [B,16,1,77]
        return self.decoder(z, text_feats).clamp(0.0, 1.0)
