"""Model sizes as small dataclasses: the generator S..H, the text side, the image tokenizer.

The published checkpoints fix everything but the generator size and the tokenizer resolution;
`tiny` shrinks every part so tests and CPU demos run in seconds (its images are noise).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

NUM_TOKENS = 77  # CLIP context length = number of 1-D latent tokens on both sides
TOKEN_CHANNELS = 16  # channels per latent token
LATENT_SCALE = 1.0143  # flow-space latent = tokenizer posterior sample * LATENT_SCALE


@dataclass(frozen=True)
class ClipTextConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = NUM_TOKENS


@dataclass(frozen=True)
class TextVAEConfig:
    width: int = 768  # equals the CLIP width: the VAE reads CLIP token states
    layers: int = 6
    heads: int = 8
    ffn: int = 1024
    dropout: float = 0.1
    projector_hidden: int = 512  # alignment MLP (context_projector)


@dataclass(frozen=True)
class GeneratorConfig:
    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class TokenizerConfig:
    resolution: int = 256
    patch_size: int = 16
    encoder_width: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_layers: int = 24
    decoder_heads: int = 16
    text_width: int = 768  # CLIP width, for the decoder's text guidance

    @property
    def grid(self) -> int:
        return self.resolution // self.patch_size

    @staticmethod
    def swiglu_hidden(width: int) -> int:
        # The reference computes int(2/3 * 4 * D) without rounding: 2048 at 768, 2730 at 1024.
        return int(2 / 3 * 4 * width)


@dataclass(frozen=True)
class FlowTokConfig:
    """Everything needed to build the text-to-image stack."""

    generator: GeneratorConfig
    text_vae: TextVAEConfig = field(default_factory=TextVAEConfig)
    clip: ClipTextConfig = field(default_factory=ClipTextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    name: str = "custom"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowTokConfig":
        return cls(
            generator=GeneratorConfig(**d["generator"]),
            text_vae=TextVAEConfig(**d.get("text_vae", {})),
            clip=ClipTextConfig(**d.get("clip", {})),
            tokenizer=TokenizerConfig(**d.get("tokenizer", {})),
            name=d.get("name", "custom"),
        )


GENERATORS = {
    "S": GeneratorConfig(depth=12, width=384, heads=6),
    "B": GeneratorConfig(depth=12, width=768, heads=12),
    "L": GeneratorConfig(depth=24, width=1024, heads=16),
    "XL": GeneratorConfig(depth=28, width=1152, heads=16),
    "H": GeneratorConfig(depth=36, width=1280, heads=20),
}

# tiny: every part shrunk; head dim stays 64 in the tokenizer so the 2-D RoPE layout is the real one.
TINY = FlowTokConfig(
    name="tiny",
    generator=GeneratorConfig(depth=2, width=96, heads=2),
    text_vae=TextVAEConfig(width=64, layers=2, heads=2, ffn=128, projector_hidden=32),
    clip=ClipTextConfig(width=64, layers=2, heads=2),
    tokenizer=TokenizerConfig(
        resolution=64,
        encoder_width=128, encoder_layers=2, encoder_heads=2,
        decoder_width=128, decoder_layers=2, decoder_heads=2,
        text_width=64,
    ),
)


def get_config(name: str, resolution: int = 256) -> FlowTokConfig:
    """`tiny`, or a generator size S/B/L/XL/H with the published text side and tokenizer."""
    if name.lower() == "tiny":
        return TINY
    key = name.upper()
    if key not in GENERATORS:
        raise ValueError(f"unknown model '{name}': expected one of tiny, {', '.join(GENERATORS)}")
    if resolution not in (256, 512):
        raise ValueError(f"the published tokenizer exists at 256 and 512 px, got {resolution}")
    return FlowTokConfig(name=key, generator=GENERATORS[key], tokenizer=TokenizerConfig(resolution=resolution))
