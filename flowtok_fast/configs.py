"""Model sizes as small dataclasses: the generator S..H, the text side, the image tokenizer.

The published checkpoints fix everything but the generator size and the tokenizer resolution;
`tiny` shrinks every part so tests and CPU demos run in seconds (its images are noise).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from flowtok_fast.errors import UserError

NUM_TOKENS = 77  # CLIP context length = number of 1-D latent tokens on both sides
TOKEN_CHANNELS = 16  # channels per latent token
LATENT_SCALE = 1.0143  # flow-space latent = tokenizer posterior sample * LATENT_SCALE


# ---------------------------------------------------------------- validation: every field checked at construction


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ints(cfg, low: int, *names: str) -> list[str]:
    return [f"{n} = {getattr(cfg, n)!r} must be an integer >= {low}" for n in names
            if not _is_int(getattr(cfg, n)) or getattr(cfg, n) < low]


def _heads(cfg, width: str, heads: str, head_dim_multiple: int = 1, why: str = "") -> list[str]:
    w, h = getattr(cfg, width), getattr(cfg, heads)
    if not (_is_int(w) and _is_int(h) and w >= 1 and h >= 1):
        return []  # already reported by _ints
    if w % h:
        return [f"{heads} = {h} must divide {width} = {w}"]
    if (w // h) % head_dim_multiple:
        return [f"head dim {width} / {heads} = {w // h} must be a multiple of {head_dim_multiple}{why}"]
    return []


def _raise_if(cfg, problems: list[str]) -> None:
    if problems:
        raise UserError(f"{type(cfg).__name__}: " + "; ".join(problems))


@dataclass(frozen=True)
class ClipTextConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = NUM_TOKENS

    def __post_init__(self):
        problems = _ints(self, 1, "width", "heads", "vocab_size") + _ints(self, 0, "layers")
        if self.context_length != NUM_TOKENS:
            problems.append(f"context_length = {self.context_length!r} must be {NUM_TOKENS} (the latent token count)")
        _raise_if(self, problems + _heads(self, "width", "heads"))


@dataclass(frozen=True)
class TextVAEConfig:
    width: int = 768  # equals the CLIP width: the VAE reads CLIP token states
    layers: int = 6
    heads: int = 8
    ffn: int = 1024
    dropout: float = 0.1
    projector_hidden: int = 512  # alignment MLP (context_projector)

    def __post_init__(self):
        problems = _ints(self, 1, "width", "heads", "ffn", "projector_hidden") + _ints(self, 0, "layers")
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout = {self.dropout!r} must be a number in [0, 1)")
        _raise_if(self, problems + _heads(self, "width", "heads"))


@dataclass(frozen=True)
class GeneratorConfig:
    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    # a few-step student (flowtok-fast distill) also reads the size of the step it takes: a
    # zero-initialised embedder added to the timestep embedding (FlowTokGenerator.step_embedder)
    step_conditioning: bool = False

    def __post_init__(self):
        problems = _ints(self, 1, "depth", "width", "heads")
        if not isinstance(self.step_conditioning, bool):
            problems.append(f"step_conditioning = {self.step_conditioning!r} must be true or false")
        if _is_int(self.width) and self.width % 2:
            problems.append(f"width = {self.width} must be even (sin-cos position embedding)")
        if not isinstance(self.mlp_ratio, numbers.Real) or not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            problems.append(f"mlp_ratio = {self.mlp_ratio!r} must be a finite number > 0")
        _raise_if(self, problems + _heads(self, "width", "heads"))

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

    def __post_init__(self):
        problems = _ints(self, 1, "resolution", "patch_size", "encoder_width", "encoder_heads", "decoder_width",
                         "decoder_heads", "text_width") + _ints(self, 0, "encoder_layers", "decoder_layers")
        if not problems and self.resolution % self.patch_size:
            problems.append(f"resolution = {self.resolution} must be a multiple of patch_size = {self.patch_size}")
        rope = " (2-D RoPE)"
        problems += _heads(self, "encoder_width", "encoder_heads", 4, rope) + _heads(self, "decoder_width", "decoder_heads", 4, rope)
        _raise_if(self, problems)

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

    def __post_init__(self):
        problems = [f"{part}.width = {getattr(self, part).width} must equal clip.width = {self.clip.width} "
                    "(it reads CLIP token states)" for part in ("text_vae",) if self.text_vae.width != self.clip.width]
        if self.tokenizer.text_width != self.clip.width:
            problems.append(f"tokenizer.text_width = {self.tokenizer.text_width} must equal clip.width = {self.clip.width}")
        _raise_if(self, problems)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "FlowTokConfig":
        """From `to_dict`'s layout; every unknown or missing key and bad value is named, with `source`
        (e.g. the config.json path) in front."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected an object with sections {list(_SECTIONS)}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_SECTIONS) - {"name"})
        if unknown:
            raise UserError(f"{source}: unknown key(s) {unknown}: expected {list(_SECTIONS)} and 'name'")
        if "generator" not in d:
            raise UserError(f"{source}: no 'generator' section: expected e.g. "
                            '{"generator": {"depth": 28, "width": 1152, "heads": 16}}')
        parts = {key: _section(kind, d.get(key, {}), key, source) for key, kind in _SECTIONS.items()}
        try:
            return cls(**parts, name=str(d.get("name", "custom")))
        except UserError as err:
            raise UserError(f"{source}: {err}") from None


def _section(kind, values, key: str, source: str):
    if not isinstance(values, dict):
        raise UserError(f"{source}: '{key}' must be an object of {kind.__name__} fields, got {type(values).__name__}")
    fields = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown key(s) in '{key}': {unknown}: expected some of {fields}")
    required = [f.name for f in dataclasses.fields(kind)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in values]
    if missing:
        raise UserError(f"{source}: '{key}' lacks {missing} (required)")
    try:
        return kind(**values)
    except UserError as err:
        raise UserError(f"{source}: '{key}': {err}") from None


_SECTIONS = {"generator": GeneratorConfig, "text_vae": TextVAEConfig, "clip": ClipTextConfig, "tokenizer": TokenizerConfig}

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
        raise UserError(f"unknown model '{name}': expected one of tiny, {', '.join(GENERATORS)}")
    if resolution not in (256, 512):
        raise UserError(f"the published tokenizer exists at 256 and 512 px, got {resolution}")
    return FlowTokConfig(name=key, generator=GENERATORS[key], tokenizer=TokenizerConfig(resolution=resolution))
