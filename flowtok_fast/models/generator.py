"""The FlowTok generator: a DiT with adaLN-Zero over 77 x 16 latent tokens (spec section 1).

Submodule and parameter names follow the published checkpoints exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS, GeneratorConfig, TextVAEConfig
from flowtok_fast.models.embeddings import sincos_1d, timestep_features
from flowtok_fast.models.text import TextVAE, context_projector
from flowtok_fast.ops import UsesOps, use


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # features in fp32 as the reference computes them, then in the MLP's dtype
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class StepEmbedder(TimestepEmbedder):
    """A student's step size d (in flow time) -> a vector added to the timestep embedding.

    Its last layer starts at zero, so a fresh student computes exactly its teacher whatever d is;
    d = 0 (an infinitesimal step: the flow's own velocity) is the teacher's meaning."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__(width, freq_dim)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)


class LabelEmbedder(nn.Module):
    """The CFG indicator: 0 = conditional, 1 = null."""

    def __init__(self, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(2, width)

    def forward(self, indicator: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(indicator.long())


class Attention(UsesOps, nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.attend(self.qkv(x), rope)

    def attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """From the packed qkv projection [B, N, 3D] on: attention, then `proj`."""
        b, n, d3 = qkv.shape
        qkv = qkv.view(b, n, 3, self.heads, d3 // (3 * self.heads))
        cos, sin = rope if rope is not None else (None, None)
        return self.proj(self.ops.attention(qkv, cos, sin))


class GeluMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)


class DiTBlock(UsesOps, nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(width, heads)
        self.mlp = GeluMlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        ops = self.ops
        # x = x + gate_msa * attn(modulate(norm1(x))), the norm fused into the qkv projection
        a = self.attn.attend(ops.modulated_linear(x, shift_msa, scale_msa, self.attn.qkv))
        # the residual add, norm2 + modulate and fc1 in one op; then GELU fused into fc2
        x, h = ops.gated_residual_modulated_linear(x, a, gate_msa, shift_mlp, scale_mlp, self.mlp.fc1)
        return ops.gated_residual(x, ops.gelu_linear(h, self.mlp.fc2), gate_mlp)


class FinalLayer(UsesOps, nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.ops.modulated_linear(x, shift, scale, self.linear)


class FlowTokGenerator(nn.Module):
    """velocity = generator(x [B,77,16], t [B] in [0,1], indicator [B] in {0 cond, 1 null}).

    Also owns the text VAE (`context_encoder`), the alignment MLP (`context_projector`) and the
    contrastive temperature, because the published checkpoints store them together.
    """

    def __init__(self, cfg: GeneratorConfig, text_cfg: TextVAEConfig = TextVAEConfig(), use_fused_kernels: bool = False):
        super().__init__()
        d = cfg.width
        self.cfg = cfg
        self.t2t_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # stored in the checkpoints but fixed: recomputed here, checked against files on load
        self.pos_embed = nn.Parameter(sincos_1d(NUM_TOKENS, d)[None], requires_grad=False)
        self.x_embedder = nn.Linear(TOKEN_CHANNELS, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(d)
        # only in few-step students; teachers and the published checkpoints have no such keys
        self.step_embedder = StepEmbedder(d) if cfg.step_conditioning else None
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, TOKEN_CHANNELS)
        self.context_encoder = TextVAE(text_cfg)
        self.context_projector = context_projector(text_cfg)
        self.reset_parameters()
        use(self, "triton" if use_fused_kernels else "reference")

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.step_embedder is not None:  # as t_embedder, but the last layer at zero
            nn.init.normal_(self.step_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.step_embedder.mlp[2].weight)
            nn.init.zeros_(self.step_embedder.mlp[2].bias)

    @property
    def step_conditioned(self) -> bool:
        return self.step_embedder is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor,
                step_size: torch.Tensor | None = None) -> torch.Tensor:
        """step_size [B] (students only): the size of the step the caller takes from t; None = 0,
        the instantaneous velocity (what a teacher computes)."""
        check_latents(x, "x")
        b = x.shape[0]
        if t.shape != (b,) or not t.is_floating_point():
            raise ValueError(f"t must be a float tensor of shape [{b}] (one time per sample), got {t.dtype} {tuple(t.shape)}")
        if indicator.shape != (b,) or indicator.is_floating_point():
            raise ValueError(
                f"indicator must be an int/bool tensor of shape [{b}] (0 = conditional, 1 = null), "
                f"got {indicator.dtype} {tuple(indicator.shape)}"
            )
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(indicator)
        if step_size is not None and self.step_embedder is None:
            raise ValueError("step_size is only read by a few-step student (generator.step_conditioning = true)")
        if self.step_embedder is not None:
            if step_size is None:
                step_size = torch.zeros_like(t)
            if step_size.shape != (b,) or not step_size.is_floating_point():
                raise ValueError(f"step_size must be a float tensor of shape [{b}], got {step_size.dtype} {tuple(step_size.shape)}")
            c = c + self.step_embedder(step_size)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)


def check_latents(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or x.shape[1:] != (NUM_TOKENS, TOKEN_CHANNELS):
        raise ValueError(f"{name} must be latents of shape [B, {NUM_TOKENS}, {TOKEN_CHANNELS}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
