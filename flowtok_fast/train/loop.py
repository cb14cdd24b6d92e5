"""What Trainer and TokenizerTrainer share: checkpoints with exact resume, and the loop around
`train_step()` (progress bar, metrics.jsonl, logging, periodic checkpoints, SIGTERM -> checkpoint
and stop).

A mixin, not a base class with its own __init__: the trainers build their models differently.
The host class sets `cfg` (with steps, global_batch, log_interval, ckpt_interval, progress,
resume, keep_checkpoints and to_dict()), `rank`, `world_size`, `device`, `output_dir`, `step`,
`history`, `model`, `optimizer`, `ema` and `data` (a source with state_dict() /
load_state_dict()), and defines `lr_at(step)`, `train_step()` and the class attributes below.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from flowtok_fast.train import checkpoint as train_ckpt

class _SigtermFlag:
    """SIGTERM (e.g. a preempted job) sets a flag; the loop saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class TrainLoop:
    LOG_TERMS: tuple[str, ...] = ()  # the loss terms of a row, as logged every log_interval steps
    BAR_TERMS: tuple[str, ...] = ("loss",)  # the loss terms shown beside the progress bar
    BAR_DESC = "train"

    def _info(self, msg: str) -> None:
        if self.rank == 0:  # one copy of each message, not one per process
            # under the host trainer's logger name, as before these methods were shared
            logging.getLogger(type(self).__module__).info(msg)

    # ------------------------------------------------------------ checkpoints

    def _extra(self) -> dict[str, int]:
        # the step and the data position: what exact resume needs besides weights and optimizer
        return {"step": self.step, **{f"data_{k}": v for k, v in self.data.state_dict().items()}}

    def save_checkpoint(self) -> Path:
        path = train_ckpt.save(
            self.output_dir, self.step, self.model, self.optimizer, self.ema, self._extra(),
            self.cfg.to_dict(), self.cfg.keep_checkpoints,
        )
        self._info(f"saved checkpoint {path}")
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        extra = train_ckpt.load(path, self.model, self.optimizer, self.ema, self._extra())
        self.step = extra["step"]
        self.data.load_state_dict({k.removeprefix("data_"): v for k, v in extra.items() if k.startswith("data_")})
        self._info(f"resumed from {path} at step {self.step}")

    def _maybe_resume(self) -> None:
        if self.cfg.resume == "none":
            return
        if self.cfg.resume == "auto":
            found = train_ckpt.list_checkpoints(self.output_dir)
            if found:
                self.load_checkpoint(found[-1])
            return
        self.load_checkpoint(self.cfg.resume)

    # ------------------------------------------------------------ the loop

    def _begin_step(self) -> tuple[float, list]:
        """Start of train_step: this step's learning rate into the optimizer, train mode; returns
        (lr, this process's micro-batches)."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        return lr, self.data.next_step()

    def _stop_agreed(self, requested: bool) -> bool:
        # every rank must stop at the same step, or the others would wait in a collective
        flag = torch.tensor([float(requested)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> list[dict]:
        """Run until `steps`; returns this run's per-step metrics. Checkpoints every
        `ckpt_interval` steps, at the end, and on SIGTERM (then returns early)."""
        cfg = self.cfg
        metrics_file = self.output_dir / "metrics.jsonl"
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress, desc=self.BAR_DESC)
        window_start, window_steps = time.perf_counter(), 0
        with _SigtermFlag() as sigterm, logging_redirect_tqdm():  # log lines print above the bar
            while self.step < cfg.steps:
                row = self.train_step()
                window_steps += 1
                row["samples_per_s"] = cfg.global_batch * window_steps / max(time.perf_counter() - window_start, 1e-9)
                self.history.append(row)
                bar.update(1)
                bar.set_postfix(**{k: f"{row[k]:.4f}" for k in self.BAR_TERMS}, sps=f"{row['samples_per_s']:.1f}")
                if self.rank == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    terms = " | ".join(f"{k} {row[k]:.4f}" for k in self.LOG_TERMS)
                    self._info(
                        f"step {self.step}/{cfg.steps} | {terms} | lr {row['lr']:.2e} | "
                        f"{row['samples_per_s']:.1f} samples/s"
                    )
                    window_start, window_steps = time.perf_counter(), 0
                stop = self._stop_agreed(sigterm.requested)
                if stop or self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if stop:
                    self._info(f"SIGTERM: stopped after step {self.step}, checkpoint saved")
                    break
        bar.close()
        return self.history
