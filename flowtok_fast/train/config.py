"""TrainConfig: one flat dataclass, loaded from YAML, then `key=value` command-line overrides.

Flat on purpose: every key can be overridden as `key=value` and unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowtok_fast.configs import FlowTokConfig, get_config
from flowtok_fast.objective import DIRECTIONS, KL_FORMS, T_SAMPLINGS, LossWeights
from flowtok_fast.train.frozen import LATENT_SAMPLING

PARALLELISMS = ("none", "ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
DATA_SOURCES = ("synthetic", "webdataset", "dali", "pretokenized")
DATA_KINDS = ("moments", "pixels")


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"  # tiny | S | B | L | XL | H (configs.get_config)
    resolution: int = 256  # image tokenizer resolution (ignored by tiny, which is 64 px)
    direction: str = "t2i"  # t2i | i2t
    generator_depth: int | None = None  # None: the model's; set to train another generator shape
    generator_width: int | None = None
    generator_heads: int | None = None
    clip_weights: str | None = None  # local CLIP ViT-L/14-336 weights; None = random (tiny only)
    tokenizer_weights: str | None = None  # FlowTiTok_*.bin / model.safetensors: the encoder (data_kind=pixels; needed unless tiny) and the latent normalisation
    # batch: global_batch = micro_batch * grad_accum * world_size; grad_accum is derived
    global_batch: int = 4096
    micro_batch: int = 32  # per process, per forward
    # optimiser (spec section 3)
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.03  # on every parameter, as in the reference
    warmup_steps: int = 10000  # linear warm-up, then constant (paper table 6)
    ema_decay: float = 0.9999
    # losses
    flow_weight: float = 1.0
    align_weight: float | None = None  # None: 1.0 (t2i) / 0.0 (i2t)
    kl_weight: float | None = None  # None: 0.01 (t2i) / 0.0 (i2t)
    kl_form: str = "reference"  # reference (sum over the local batch) | per_sample
    cfg_prob: float = 0.1
    t_sampling: str = "logit_normal"  # logit_normal (the reference) | uniform
    t_logit_loc: float = 0.0  # logit_normal: t = sigmoid(N(loc, scale^2)); the reference is (0, 1)
    t_logit_scale: float = 1.0
    latent_sampling: str = "sample"  # image latents: sample (the reference) | mean (the posterior mean)
    text_decoder: bool = True  # image-to-text: train the Z_T -> CLIP ids decoder jointly
    text_dec_weight: float = 1.0
    # systems
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    parallelism: str = "none"  # none | ddp | fsdp
    activation_checkpointing: bool = False  # shorthand for recompute=full
    # recompute in backward: none | pointwise | attn | qkv | attn+qkv | full (per block);
    # `flowtok-fast plan` picks the cheapest that fits the GPU memory
    recompute: str = "none"
    compile_blocks: bool = False
    fused_kernels: bool = False
    # run
    steps: int = 250000  # paper table 6, pre-training
    log_interval: int = 10
    ckpt_interval: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str = "outputs/train"
    resume: str = "auto"  # auto (latest in output_dir/checkpoints) | none | a checkpoint directory
    progress: bool = True  # tqdm bar on rank 0
    # data (see flowtok_fast/train/data.py for the batch contract)
    # data_source: synthetic | webdataset (image + caption shards, PyTorch loader; data_kind=pixels)
    #   | dali (the same shards through NVIDIA DALI; data_kind=pixels)
    #   | pretokenized (moments + caption shards from `flowtok-fast pretokenize`; data_kind=moments)
    data_source: str = "synthetic"
    data_kind: str = "moments"  # moments [B,32,1,77] | pixels [B,3,H,W]
    data_size: int = 1024  # synthetic dataset length
    data_path: str | None = None  # shards: a directory, a glob, a brace pattern, or several joined by '::'
    data_workers: int = 4  # loader processes per training process (dali: decoding threads)
    data_index_dir: str | None = None  # shard .idx files if not beside the shards (dali writes missing ones)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        choices = {
            "direction": DIRECTIONS, "kl_form": KL_FORMS, "precision": PRECISIONS,
            "parallelism": PARALLELISMS, "data_source": DATA_SOURCES, "data_kind": DATA_KINDS,
            "t_sampling": T_SAMPLINGS, "latent_sampling": LATENT_SAMPLING,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {allowed}")
        if self.data_source != "synthetic":
            if not self.data_path:
                raise ValueError(f"data_source={self.data_source} needs data_path: a directory, glob or brace pattern of .tar shards")
            kind = "moments" if self.data_source == "pretokenized" else "pixels"
            if self.data_kind != kind:
                raise ValueError(f"data_source={self.data_source} gives {kind}: set data_kind={kind}")
        from flowtok_fast.perf.planner import POLICIES

        if self.recompute not in POLICIES:
            raise ValueError(f"recompute={self.recompute!r}: expected one of {list(POLICIES)}")
        if self.activation_checkpointing and self.recompute == "none":
            self.recompute = "full"
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")
        for key in ("global_batch", "micro_batch", "steps", "log_interval", "ckpt_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.warmup_steps < 0 or self.keep_checkpoints < 0:
            raise ValueError("warmup_steps and keep_checkpoints must be >= 0")
        cfg = self.model_config()  # unknown model or resolution, or a bad generator shape: a clear error now
        if cfg.generator.width % cfg.generator.heads or cfg.generator.depth < 1:
            raise ValueError(f"generator width {cfg.generator.width} must be a multiple of heads {cfg.generator.heads}, depth >= 1")

    def model_config(self) -> FlowTokConfig:
        """The model's config with the generator_* overrides applied."""
        cfg = get_config(self.model, self.resolution)
        shape = {k: getattr(self, f"generator_{k}") for k in ("depth", "width", "heads")}
        shape = {k: v for k, v in shape.items() if v is not None}
        if not shape:
            return cfg
        return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, **shape))

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.flow_weight, self.align_weight, self.kl_weight, self.kl_form, self.cfg_prob,
                           self.text_dec_weight)

    def grad_accum(self, world_size: int) -> int:
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch={self.global_batch} is not a multiple of micro_batch * world_size = "
                f"{self.micro_batch} * {world_size}"
            )
        return self.global_batch // per_step

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def coerce(cls, key: str, value):
    """YAML gives '4e-4' as a string and 1 for 1.0: convert by the declared type of `cls`'s field
    (a string, as the config modules use `from __future__ import annotations`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"unknown config key '{key}': expected one of {', '.join(fields)}")
    kind = fields[key].type
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ValueError(f"{key} cannot be null")
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("tuple"):
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}={value!r}: expected {kind}") from err


def parse_overrides(items: list[str], cls=TrainConfig) -> dict:
    """`key=value` strings -> {key: value}: each value read as YAML, then typed by `cls`'s field."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override '{item}': expected key=value")
        out[key.strip()] = coerce(cls, key.strip(), yaml.safe_load(value) if value else value)
    return out


def build_config(cls, path: str | Path | None, overrides: list[str] = (), values: dict | None = None,
                 what: str = "training config"):
    """A `cls` from a YAML file (or the defaults when path is None), then `values`, then `key=value`
    overrides, each typed by its field. `what` names the file in the not-found error."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    raw.update(values or {})
    typed = {k: coerce(cls, k, v) for k, v in raw.items()}
    typed.update(parse_overrides(list(overrides), cls))
    return cls(**typed)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None) plus `key=value` overrides."""
    return build_config(TrainConfig, path, overrides)
