"""TrainConfig: one flat dataclass, loaded from YAML, then `key=value` command-line overrides.

Flat on purpose: every key can be overridden as `key=value` and unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowtok_fast.configs import FlowTokConfig, get_config
from flowtok_fast.errors import UserError
from flowtok_fast.objective import DIRECTIONS, KL_FORMS, T_SAMPLINGS, LossWeights
from flowtok_fast.train.frozen import LATENT_SAMPLING

PARALLELISMS = ("none", "ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
DATA_SOURCES = ("synthetic", "webdataset", "dali", "pretokenized")
DATA_KINDS = ("moments", "pixels")


# value ranges for check_ranges: (test, what is expected)
AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0 = (lambda v: v >= 0, "an integer >= 0")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FINITE = (math.isfinite, "a finite number")
UNIT = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
UNIT_OPEN = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def check_choices(cfg, choices: dict) -> None:
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{key}={getattr(cfg, key)!r}: expected one of {', '.join(map(str, allowed))}")


def check_ranges(cfg, rules: dict) -> None:
    """Each key's value (None = unset, skipped) must pass its rule: a UserError naming the key."""
    for key, (test, expected) in rules.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        ok = False
        try:
            ok = not isinstance(value, bool) and bool(test(value))
        except TypeError:
            pass
        if not ok:
            raise UserError(f"{key}={value!r}: expected {expected}")


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
        from flowtok_fast.perf.planner import POLICIES

        choices["recompute"] = tuple(POLICIES)
        check_choices(self, choices)
        check_ranges(self, {
            **{k: AT_LEAST_1 for k in ("global_batch", "micro_batch", "steps", "log_interval", "ckpt_interval", "data_size")},
            **{k: AT_LEAST_0 for k in ("warmup_steps", "keep_checkpoints", "seed", "data_workers")},
            "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "ema_decay": UNIT_OPEN, "cfg_prob": UNIT,
            "flow_weight": NON_NEGATIVE, "align_weight": NON_NEGATIVE, "kl_weight": NON_NEGATIVE,
            "text_dec_weight": NON_NEGATIVE, "t_logit_loc": FINITE, "t_logit_scale": POSITIVE,
        })
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise UserError(f"betas={list(self.betas)}: expected two numbers in [0, 1)")
        if self.global_batch % self.micro_batch:
            raise UserError(f"global_batch={self.global_batch}: expected a multiple of micro_batch={self.micro_batch}")
        if self.data_source != "synthetic":
            if not self.data_path:
                raise UserError(f"data_source={self.data_source} needs data_path: a directory, glob or brace pattern of .tar shards")
            kind = "moments" if self.data_source == "pretokenized" else "pixels"
            if self.data_kind != kind:
                raise UserError(f"data_source={self.data_source} gives {kind}: set data_kind={kind}")
        if self.activation_checkpointing and self.recompute == "none":
            self.recompute = "full"
        for key in ("generator_depth", "generator_width", "generator_heads"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{key}={value!r}: expected an integer >= 1 (or null for the model's)")
        keys = ("model", "resolution", "generator_depth", "generator_width", "generator_heads")
        shape = ", ".join(f"{k}={getattr(self, k)}" for k in keys if getattr(self, k) is not None)
        try:
            gen = self.model_config().generator  # unknown model or resolution, or a bad generator shape: a clear error now
        except UserError as err:
            raise UserError(f"{shape}: {err}") from None
        if gen.width % gen.heads or gen.width % 2:
            raise UserError(f"{shape}: the generator width {gen.width} must be even (sin-cos positions) and a multiple "
                            f"of its heads {gen.heads}")

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
            raise UserError(
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
        raise UserError(f"unknown config key '{key}': expected one of {', '.join(fields)}")
    kind = fields[key].type
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise UserError(f"{key} cannot be null")
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
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{key}={value!r}: expected {kind}") from None


def parse_overrides(items: list[str], cls=TrainConfig) -> dict:
    """`key=value` strings -> {key: value}: each value read as YAML, then typed by `cls`'s field."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value")
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value  # e.g. a path with a colon: kept as text, typed below
        out[key.strip()] = coerce(cls, key.strip(), parsed)
    return out


def build_config(cls, path: str | Path | None, overrides: list[str] = (), values: dict | None = None,
                 what: str = "training config"):
    """A `cls` from a YAML file (or the defaults when path is None), then `values`, then `key=value`
    overrides, each typed by its field. `what` names the file in the not-found error."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{what} not found: {path}" + (" (a directory)" if path.is_dir() else ""))
        try:
            raw = yaml.safe_load(path.read_text())
        except (UnicodeDecodeError, OSError) as err:
            raise UserError(f"{path}: cannot read the {what} ({err})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UserError(f"{path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
        if raw is None:  # not the defaults: an empty file is a mistake (the wrong file, or one not yet written)
            raise UserError(f"{path}: empty config: expected a mapping of config keys such as `model: tiny`")
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    try:
        typed = {k: coerce(cls, str(k), v) for k, v in raw.items()}
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    typed.update({k: coerce(cls, k, v) for k, v in (values or {}).items()})
    typed.update(parse_overrides(list(overrides), cls))
    return cls(**typed)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None) plus `key=value` overrides."""
    return build_config(TrainConfig, path, overrides)
