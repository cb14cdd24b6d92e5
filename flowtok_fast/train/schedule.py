"""The learning rate at a step: linear warm-up over `warmup_steps`, then constant or a cosine down to
`min_lr_ratio * lr` at `steps` (the tokenizer trainer's and distillation's `schedule` setting)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, cfg) -> float:
    """cfg: any config with lr, warmup_steps, steps, schedule and min_lr_ratio."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
