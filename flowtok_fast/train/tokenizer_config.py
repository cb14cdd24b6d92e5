"""TokenizerTrainConfig: the tokenizer trainer's flat config (YAML + `key=value` overrides, as
config.py does for the generator), every value range-checked up front with a UserError naming the key."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from flowtok_fast.configs import ClipTextConfig, TokenizerConfig, get_config
from flowtok_fast.errors import UserError
from flowtok_fast.train.config import (
    AT_LEAST_0, AT_LEAST_1, FINITE, NON_NEGATIVE, POSITIVE, UNIT, UNIT_OPEN, build_config, check_choices, check_ranges,
)
from flowtok_fast.train.schedule import SCHEDULES

INITS = ("fan_in", "default")


@dataclass
class TokenizerTrainConfig:
    # model: `model` picks the base: tiny, or "published" (the 256/512 px FlowTiTok with ViT-L
    # CLIP); the tokenizer fields below override the base's when set
    model: str = "tiny"
    resolution: int | None = None  # None: the base's (tiny 64, else 256)
    patch_size: int | None = None
    encoder_width: int | None = None
    encoder_layers: int | None = None
    encoder_heads: int | None = None
    decoder_width: int | None = None
    decoder_layers: int | None = None
    decoder_heads: int | None = None
    clip_weights: str | None = None  # local CLIP ViT-L/14-336 weights; None = random (tiny only)
    init_weights: str | None = None  # start from a FlowTiTok file (fine-tuning), e.g. FlowTiTok_256.bin
    # from scratch only: "fan_in" draws every Linear / Conv2d weight from N(0, 1/fan_in) (truncated
    # at 2 sigma); "default" keeps the model's N(0, 0.02^2), which suits widths of ~768 and up but
    # leaves a narrow tokenizer's signal path ~1e-3 strong, so it trains far slower
    init: str = "fan_in"
    # from scratch only: multiply the q and k projections of every attention layer by this at
    # init. The decoder's mask tokens are identical and learn where they are only through 2-D RoPE
    # in attention; sharper initial attention (gain ~3) starts that position routing sooner.
    init_qk_gain: float = 1.0
    # from scratch only: the initial posterior log-variance (conv_out's logvar bias). The default
    # init (~0, i.e. unit noise on near-zero means) hides the latents from the decoder at first;
    # a low value lets reconstruction use them from the first steps. None = leave the init.
    init_logvar: float | None = -6.0
    # losses
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-4  # on the per-element mean KL
    perceptual_weight: float = 0.1  # used only if perceptual_weights is a local file
    perceptual_weights: str | None = None  # torchvision VGG16 state dict (vgg16-397923af.pth or its features.*)
    text_drop_prob: float = 0.1
    # batch and optimiser
    global_batch: int = 64
    micro_batch: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    schedule: str = "constant"  # after warm-up: constant | cosine (to min_lr_ratio * lr at `steps`)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.999
    # systems
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    parallelism: str = "none"  # none | ddp
    fused_kernels: bool = False
    # run
    steps: int = 100000
    log_interval: int = 50
    ckpt_interval: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str = "outputs/tokenizer"
    resume: str = "auto"  # auto | none | a checkpoint directory
    progress: bool = True
    # data when none is passed in: random pixels and captions (smoke runs)
    data_source: str = "synthetic"
    data_size: int = 1024

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_choices(self, {"schedule": SCHEDULES, "precision": ("auto", "bf16", "fp32"),
                             "parallelism": ("none", "ddp"), "data_source": ("synthetic",), "init": INITS})
        check_ranges(self, {
            **{k: AT_LEAST_1 for k in ("global_batch", "micro_batch", "steps", "log_interval", "ckpt_interval", "data_size",
                                       "resolution", "patch_size", "encoder_width", "encoder_layers", "encoder_heads",
                                       "decoder_width", "decoder_layers", "decoder_heads")},
            **{k: AT_LEAST_0 for k in ("warmup_steps", "keep_checkpoints", "seed")},
            **{k: NON_NEGATIVE for k in ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "grad_clip", "weight_decay")},
            "lr": POSITIVE, "init_qk_gain": POSITIVE, "init_logvar": FINITE, "min_lr_ratio": UNIT,
            "ema_decay": UNIT_OPEN, "text_drop_prob": UNIT,
        })
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise UserError(f"betas={list(self.betas)}: expected two numbers in [0, 1)")
        if self.global_batch % self.micro_batch:
            raise UserError(f"global_batch={self.global_batch}: expected a multiple of micro_batch={self.micro_batch}")
        self.tokenizer_config()  # bad sizes: a clear error now

    def base(self):
        """tiny, or the published tokenizer and CLIP ("published", or any generator size S..H)."""
        if self.model.lower() == "tiny":
            return get_config("tiny")
        return get_config("B" if self.model.lower() == "published" else self.model, self.resolution or 256)

    def tokenizer_config(self) -> TokenizerConfig:
        base = self.base()
        fields = {f.name for f in dataclasses.fields(TokenizerConfig)}
        over = {k: getattr(self, k) for k in fields if hasattr(self, k) and getattr(self, k) is not None}
        for side in ("encoder", "decoder"):
            w, h = over.get(f"{side}_width", getattr(base.tokenizer, f"{side}_width")), over.get(f"{side}_heads", getattr(base.tokenizer, f"{side}_heads"))
            if w % h or (w // h) % 4:
                raise UserError(f"{side}_width={w}, {side}_heads={h}: expected heads dividing the width into a head "
                                "dim divisible by 4 (2-D RoPE)")
        res, patch = over.get("resolution", base.tokenizer.resolution), over.get("patch_size", base.tokenizer.patch_size)
        if res % patch:
            raise UserError(f"resolution={res}: expected a multiple of patch_size={patch}")
        try:
            return dataclasses.replace(base.tokenizer, **over, text_width=base.clip.width)
        except UserError as err:
            raise UserError(f"tokenizer shape {over}: {err}") from None

    def clip_config(self) -> ClipTextConfig:
        return self.base().clip

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def load_tokenizer_config(path: str | Path | None, overrides: list[str] = (), **values) -> TokenizerTrainConfig:
    """From a YAML file (or the defaults), then `values`, then `key=value` strings."""
    return build_config(TokenizerTrainConfig, path, overrides, values, what="tokenizer training config")
