"""What Trainer and TokenizerTrainer share: checkpoints with exact resume, and the loop around
`train_step()` (progress bar, metrics.jsonl, logging, periodic checkpoints, SIGTERM or Ctrl-C ->
checkpoint and stop; a second Ctrl-C aborts at once).

Nothing is lost between runs: a resumed run first cuts `metrics.jsonl` back to the resumed step
(so no step is logged twice after a kill -9) and deletes the temporary directories of saves that
never finished; `resume=auto` takes the newest checkpoint that is complete and readable, warning
about each newer broken one. The data source's skip counts (corrupt images, missing captions,
empty shards) are saved with every checkpoint, restored on resume and printed at the end.

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
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from flowtok_fast.checkpoint import CheckpointError, _atomic_write
from flowtok_fast.errors import UserError
from flowtok_fast.train import checkpoint as train_ckpt

METRICS_FILE = "metrics.jsonl"


class _StopSignals:
    """SIGTERM (a preempted job) or the first Ctrl-C (SIGINT) sets `requested` (the signal's
    name): the loop saves a checkpoint after the current step and returns. A second Ctrl-C raises
    KeyboardInterrupt at once, without saving."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again aborts without saving)",
                      file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of `path` up to `step` (a resumed run logs the later ones again); rows cut
    short by a kill are dropped too. Atomic. Returns the number of rows removed."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        _atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{ln}\n" for ln in keep)))
    return dropped


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

    def _skips(self):
        """The data source's SkipLog (webdataset / DALI sources), or None."""
        return getattr(self.data, "skips", None)

    def save_checkpoint(self) -> Path:
        skips = self._skips()
        path = train_ckpt.save(
            self.output_dir, self.step, self.model, self.optimizer, self.ema, self._extra(),
            self.cfg.to_dict(), self.cfg.keep_checkpoints,
            rank_state={"skipped": skips.state_dict()} if skips is not None else None,
        )
        self._info(f"saved checkpoint {path}")
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        extra, rank_state = train_ckpt.load(path, self.model, self.optimizer, self.ema, self._extra())
        self.step = extra["step"]
        self.data.load_state_dict({k.removeprefix("data_"): v for k, v in extra.items() if k.startswith("data_")})
        skips = self._skips()
        if skips is not None and "skipped" in rank_state:
            skips.load_state_dict(rank_state["skipped"])
        self._info(f"resumed from {path} at step {self.step}")

    def _maybe_resume(self) -> None:
        """Clean up after a killed run (rank 0), then resume as `cfg.resume` says."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"output_dir={self.output_dir}: a file, expected a directory (created if missing)")
        if self.rank == 0:
            for stale in train_ckpt.remove_stale(self.output_dir):
                self._info(f"removed {stale}: the temporary directory of a save that did not finish")
        if self.cfg.resume == "none":
            return
        if self.cfg.resume != "auto":
            self.load_checkpoint(self.cfg.resume)
            return
        found = train_ckpt.list_checkpoints(self.output_dir)
        broken = []
        for path in reversed(found):  # newest first: fall back past broken ones
            try:
                self.load_checkpoint(path)
            except CheckpointError as err:
                broken.append(str(err))
                if self.rank == 0:
                    logging.getLogger(type(self).__module__).warning(
                        "resume=auto: skipping broken checkpoint %s: %s", path, err)
                continue
            return
        if broken:
            raise CheckpointError(
                f"resume=auto: no readable checkpoint in {train_ckpt.checkpoints_dir(self.output_dir)} "
                f"({'; '.join(broken)}); set resume=none to start over or resume=DIR to pick one")

    # ------------------------------------------------------------ the loop

    def _begin_step(self) -> tuple[float, list]:
        """Start of train_step: this step's learning rate into the optimizer, train mode; returns
        (lr, this process's micro-batches)."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        return lr, self.data.next_step()

    def _stop_agreed(self, requested: str | None) -> str | None:
        """The stop signal's name if any rank got one (every rank must stop at the same step, or
        the others would wait in a collective); SIGTERM wins over SIGINT."""
        flag = torch.tensor([float(signal.Signals[requested].value if requested else 0)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        number = int(flag.item())
        return signal.Signals(number).name if number else None

    def exit_code(self) -> int:
        """For a CLI: 0 after a finished run, 128 + the signal's number after a stop on a signal."""
        stopped = getattr(self, "stopped_by", None)
        return 128 + signal.Signals[stopped].value if stopped else 0

    def train(self) -> list[dict]:
        """Run until `steps`; returns this run's per-step metrics. Checkpoints every
        `ckpt_interval` steps, at the end, and on SIGTERM / Ctrl-C (then returns early, with
        `stopped_by` set to the signal's name)."""
        cfg = self.cfg
        self.stopped_by = None
        metrics_file = self.output_dir / METRICS_FILE
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dropped = truncate_metrics(metrics_file, self.step)
            if dropped:
                self._info(f"{metrics_file}: removed {dropped} row(s) past step {self.step} (logged again from here)")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress, desc=self.BAR_DESC)
        window_start, window_steps = time.perf_counter(), 0
        with _StopSignals() as signals, logging_redirect_tqdm():  # log lines print above the bar
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
                stop = self._stop_agreed(signals.requested)
                if stop or self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if stop:
                    self.stopped_by = stop
                    self._info(f"{self.stopped_by}: stopped after step {self.step} of {cfg.steps}, checkpoint saved; "
                               f"run the same command again to resume")
                    break
        bar.close()
        skips = self._skips()
        if skips is not None:
            skips.log_total()
        return self.history
