"""The text side (spec section 2): CLIP text features, the text VAE and the alignment MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS, ClipTextConfig, TextVAEConfig

# ---------------------------------------------------------------- CLIP text tower (no visual tower)


class _ClipAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class _QuickGELU(nn.Module):
    # OpenAI's CLIP weights were trained with this activation, not the exact GELU.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ClipBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _ClipAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_ClipBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipTextEncoder(nn.Module):
    """OpenAI CLIP ViT-L/14-336 text tower: per-token features ln_final(transformer(emb + pos)).

    All 77 token states, causal mask, no text_projection, no pooling -> [B, 77, width].
    Parameter names match open_clip and OpenAI state dicts (their text keys are top-level).
    """

    def __init__(self, cfg: ClipTextConfig = ClipTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = _ClipTransformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] != self.cfg.context_length or ids.is_floating_point():
            raise ValueError(
                f"CLIP token ids must be an integer tensor [B, {self.cfg.context_length}], got {ids.dtype} {tuple(ids.shape)}"
            )
        x = self.token_embedding(ids) + self.positional_embedding
        return self.ln_final(self.transformer(x))


_TOKENIZER = None


def tokenize(prompts: list[str]) -> torch.Tensor:
    """open_clip's BPE tokenizer for ViT-L-14-336: [B, 77] int64, start/end tokens, padding id 0."""
    global _TOKENIZER
    if isinstance(prompts, str):
        prompts = [prompts]
    if _TOKENIZER is None:
        import open_clip  # the BPE vocabulary ships inside the package: no network needed

        _TOKENIZER = open_clip.get_tokenizer("ViT-L-14-336")
    return _TOKENIZER(list(prompts), context_length=NUM_TOKENS)


def overlong_prompts(prompts: list[str]) -> list[tuple[str, int]]:
    """(prompt, its BPE token count) for each prompt that `tokenize` truncates: more than 75
    tokens between the start and end tokens."""
    tokenize([""])  # loads the shared tokenizer
    counts = ((p, len(_TOKENIZER.encode(p))) for p in prompts if len(p) > NUM_TOKENS - 2)  # a token is >= 1 char
    return [(p, n) for p, n in counts if n > NUM_TOKENS - 2]


def words_outside(prompt: str, vocabulary: frozenset[int]) -> list[str]:
    """The prompt's words (BPE pieces joined back) with a token id outside `vocabulary`."""
    tokenize([""])  # loads the shared tokenizer
    ids = _TOKENIZER.encode(prompt)[: NUM_TOKENS - 2]
    return [_TOKENIZER.decode([t]).strip() for t in ids if t not in vocabulary]


# ---------------------------------------------------------------- text VAE (context_encoder)


class ScaledLayerNorm(nn.Module):
    """The reference's LayerNorm: g * (x - mean) / (std + eps) + b, UNBIASED std, eps on the std."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(width))
        self.b = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 even under autocast
        mean = xf.mean(-1, keepdim=True)
        std = xf.std(-1, keepdim=True, unbiased=True)
        return (self.g * (xf - mean) / (std + self.eps) + self.b).to(x.dtype)


class _VAEAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.W_Q, self.W_K, self.W_V, self.W_O = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(
            split(self.W_Q(x)), split(self.W_K(x)), split(self.W_V(x)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.W_O(o.transpose(1, 2).reshape(b, n, d))


class _VAEFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.ffn_1 = nn.Linear(width, hidden)
        self.ffn_2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_2(self.dropout(F.relu(self.ffn_1(x))))


class _PostLNLayer(nn.Module):
    def __init__(self, cfg: TextVAEConfig):
        super().__init__()
        self.attn = _VAEAttention(cfg.width, cfg.heads, cfg.dropout)
        self.feed_forward = _VAEFeedForward(cfg.width, cfg.ffn, cfg.dropout)
        self.norm1 = ScaledLayerNorm(cfg.width)
        self.norm2 = ScaledLayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm1(x + self.attn(x))
        return self.norm2(t + self.feed_forward(t))


class TextVAE(nn.Module):
    """CLIP token states [B,77,768] -> posterior (mu, logvar), each [B, 77, 16] in fp32."""

    def __init__(self, cfg: TextVAEConfig = TextVAEConfig()):
        super().__init__()
        self.layers = nn.ModuleList(_PostLNLayer(cfg) for _ in range(cfg.layers))
        self.linear = nn.Linear(cfg.width, 2 * TOKEN_CHANNELS)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.dim() != 3 or feats.shape[1] != NUM_TOKENS:
            raise ValueError(f"text VAE input must be CLIP features [B, {NUM_TOKENS}, width], got {tuple(feats.shape)}")
        x = feats
        for layer in self.layers:
            x = layer(x)
        mu, logvar = self.linear(x).float().chunk(2, dim=-1)  # no clamp, as in the reference
        return mu, logvar

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps. The reference samples at inference too."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps


def context_projector(cfg: TextVAEConfig = TextVAEConfig()) -> nn.Sequential:
    """Alignment target MLP (training only): CLIP features -> [B, 77, 16]."""
    h = cfg.projector_hidden
    return nn.Sequential(
        nn.Linear(cfg.width, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, TOKEN_CHANNELS)
    )


# ---------------------------------------------------------------- text decoder (image-to-text)

SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0


class TextDecoder(nn.Module):
    """Text latents Z_T [B, 77, 16] -> CLIP token logits [B, 77, vocab], all positions at once.

    Non-autoregressive: the same post-LN blocks as the text VAE over an input projection plus a
    learned position embedding (the latents of a permutation-equivariant VAE carry position only
    implicitly), then a vocabulary head. Trained with cross-entropy on every position, padding
    (id 0) included, so the decoder also learns where the caption ends.
    """

    def __init__(self, cfg: TextVAEConfig = TextVAEConfig(), vocab_size: int = 49408):
        super().__init__()
        self.embed = nn.Linear(TOKEN_CHANNELS, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(NUM_TOKENS, cfg.width) * 0.02)
        self.layers = nn.ModuleList(_PostLNLayer(cfg) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.width, vocab_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[1:] != (NUM_TOKENS, TOKEN_CHANNELS):
            raise ValueError(f"text latents must be [B, {NUM_TOKENS}, {TOKEN_CHANNELS}], got {tuple(z.shape)}")
        x = self.embed(z.to(self.embed.weight.dtype)) + self.positional_embedding
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def loss(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = self(z)
        return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())

    @torch.no_grad()
    def decode_ids(self, z: torch.Tensor) -> torch.Tensor:
        return self(z).argmax(-1)


def detokenize(ids: torch.Tensor) -> list[str]:
    """CLIP token ids [B, 77] -> captions: the tokens between start and end of text."""
    tokenize([""])  # loads the shared tokenizer
    captions = []
    for row in ids.tolist():
        if SOT_ID in row:
            row = row[row.index(SOT_ID) + 1 :]
        if EOT_ID in row:
            row = row[: row.index(EOT_ID)]
        row = [t for t in row if t not in (SOT_ID, EOT_ID, PAD_ID)]
        captions.append(_TOKENIZER.decode(row).strip())
    return captions
