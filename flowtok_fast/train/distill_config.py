"""DistillConfig: `flowtok-fast distill TEACHER_DIR --out STUDENT_DIR [CONFIG.yaml] [key=value ...]`.

Flat like TrainConfig (YAML, then key=value overrides, unknown keys are errors). The teacher and
the student's directory come from the command line; a resumed run must use the same settings
(checked against the run's saved config: `check_resumable`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from flowtok_fast.errors import UserError
from flowtok_fast.train.config import (AT_LEAST_0, AT_LEAST_1, NON_NEGATIVE, PARALLELISMS, POSITIVE, PRECISIONS, UNIT,
                                       UNIT_OPEN, check_choices, check_ranges)
from flowtok_fast.train.schedule import SCHEDULES

TEACHER_SAMPLERS = ("euler", "heun")
DISTANCES = ("mse", "l1")
# settings a resumed run may change (how long, how often, where progress goes); the rest fix the run
RESUMABLE = ("steps", "log_interval", "ckpt_interval", "keep_checkpoints", "progress", "resume", "data_workers")


@dataclass
class DistillConfig:
    teacher: str = ""  # the teacher's model directory (command line)
    out: str = ""  # the student's model directory, written at the end (command line --out)
    # data: the teacher makes every target, so t2i needs only prompts, i2t only images
    prompts: str | None = None  # t2i: a prompt file as `evaluate` reads it (text lines, Karpathy or MJHQ JSON)
    images: str | None = None  # i2t: a directory of images (png/jpg/webp), read recursively
    # what the student learns: one step of each size 1/N along the teacher's guided ODE
    student_steps: tuple[int, ...] = (1, 2, 4)  # the step counts it serves
    cfg_scale: float | None = None  # guidance built into the student; None: the teacher's recommended scale
    teacher_steps: int = 32  # the teacher's ODE, on the consistent grid: a multiple of every student step count
    teacher_sampler: str = "euler"  # euler | heun
    distance: str = "mse"  # mse | l1: how far the student's velocity (and image) is from the teacher's
    image_weight: float = 0.0  # t2i: + this x pixel MSE of the decoded end images (student's vs teacher's)
    extra_depth: int = 0  # student-only DiT blocks after the teacher's, zero-gated (the student starts as the teacher)
    # optimiser
    global_batch: int = 64  # trajectories per step (each gives sum(student_steps) student rows)
    micro_batch: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "constant"  # after warm-up: constant | cosine (to min_lr_ratio * lr at `steps`)
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.995
    # systems
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    parallelism: str = "none"  # none | ddp | fsdp (torchrun)
    recompute: str = "none"
    compile_blocks: bool = False
    fused_kernels: bool = False
    data_workers: int = 0
    # run
    steps: int = 1000
    log_interval: int = 10
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str | None = None  # checkpoints + metrics.jsonl; None: STUDENT_DIR.run
    resume: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.student_steps = self._step_counts(self.student_steps)
        from flowtok_fast.perf.planner import POLICIES

        check_choices(self, {"precision": PRECISIONS, "parallelism": PARALLELISMS, "teacher_sampler": TEACHER_SAMPLERS,
                             "schedule": SCHEDULES, "distance": DISTANCES,
                             "recompute": tuple(POLICIES)})
        check_ranges(self, {
            **{k: AT_LEAST_1 for k in ("global_batch", "micro_batch", "steps", "log_interval", "ckpt_interval",
                                       "teacher_steps")},
            **{k: AT_LEAST_0 for k in ("warmup_steps", "keep_checkpoints", "seed", "data_workers", "extra_depth")},
            "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "ema_decay": UNIT_OPEN, "min_lr_ratio": UNIT,
            "image_weight": NON_NEGATIVE,
        })
        if self.cfg_scale is not None and not math.isfinite(self.cfg_scale):
            raise UserError(f"cfg_scale={self.cfg_scale!r}: expected a finite number (or null for the teacher's)")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise UserError(f"betas={list(self.betas)}: expected two numbers in [0, 1)")
        if self.global_batch % self.micro_batch:
            raise UserError(f"global_batch={self.global_batch}: expected a multiple of micro_batch={self.micro_batch}")
        bad = [n for n in self.student_steps if self.teacher_steps % n]
        if bad:
            raise UserError(f"teacher_steps={self.teacher_steps} must be a multiple of every student step count "
                            f"{list(self.student_steps)} (not of {bad}): the student's grid points lie on the teacher's")
        if self.prompts and self.images:
            raise UserError("give prompts= (text-to-image teacher) or images= (image-to-text teacher), not both")
        if self.output_dir is None and self.out:
            self.output_dir = str(Path(self.out).with_name(Path(self.out).name + ".run"))

    @staticmethod
    def _step_counts(value) -> tuple[int, ...]:
        items = [value] if isinstance(value, (int, float, str)) else list(value)
        if isinstance(value, str):
            items = [v for v in value.replace(",", " ").split() if v]
        try:
            counts = tuple(sorted({int(v) for v in items if float(v) == int(float(v))}))
        except (TypeError, ValueError):
            counts = ()
        if not counts or len(counts) != len(items) or any(n < 1 for n in counts):
            raise UserError(f"student_steps={value!r}: expected distinct integers >= 1, e.g. [1, 2, 4]")
        return counts

    def grad_accum(self, world_size: int) -> int:
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise UserError(f"global_batch={self.global_batch} is not a multiple of micro_batch * world_size = "
                            f"{self.micro_batch} * {world_size}")
        return self.global_batch // per_step

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["student_steps"] = list(self.betas), list(self.student_steps)
        return d


def load_distill_config(path: str | None, overrides: list[str], teacher: str, out: str) -> DistillConfig:
    from flowtok_fast.train.config import build_config

    return build_config(DistillConfig, path, overrides, values={"teacher": teacher, "out": out},
                        what="distillation config")


def check_resumable(saved: dict, cfg: DistillConfig, source: str) -> None:
    """A resumed run must be the same run: every setting but RESUMABLE equal to the saved one."""
    now = cfg.to_dict()
    changed = [f"{k}={now[k]!r} (the run has {saved[k]!r})" for k in sorted(now)
               if k not in RESUMABLE and k in saved and saved[k] != now[k]]
    if changed:
        raise UserError(f"{source}: resuming with changed settings: {', '.join(changed)}; use the run's settings, "
                        "or another --out / output_dir (or resume=none) to start a new run")
