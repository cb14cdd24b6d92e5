"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a directory `<output_dir>/checkpoints/step_<N>` holding model, optimizer and EMA
(sharded as they live: DCP reshards on load, so the world size may change between runs), the
step, the data position, every rank's RNG states and the run's config. It is written to a hidden
temporary directory and renamed into place once every rank has finished, so a crash mid-save
never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from flowtok_fast.checkpoint import _atomic_write

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.' and never match)."""
    root = checkpoints_dir(output_dir)
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet():
    # without a process group DCP warns that it assumes a single process: that is the intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _state(model, optimizer, ema, extra: dict[str, int]) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "ema": ema.state_dict(),
        "trainer": {k: torch.tensor(v, dtype=torch.int64) for k, v in extra.items()},
        # per-rank keys: DCP would otherwise keep one rank's copy of an identical-looking entry
        f"rng_rank{_rank()}": _rng_state(),
    }


def save(output_dir: str | Path, step: int, model, optimizer, ema, extra: dict[str, int], config: dict, keep: int = 2) -> Path:
    """Write checkpoint `step_<step>` (collective: every rank calls it). Returns its path."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
    _barrier()
    with _quiet():
        dcp.save(_state(model, optimizer, ema, extra), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        _atomic_write(tmp / "train_config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
        shutil.rmtree(final, ignore_errors=True)  # re-saving a step after a resume
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, model, optimizer, ema, extra: dict[str, int]) -> dict[str, int]:
    """Restore model, optimizer, EMA and this rank's RNG states in place from `path`; returns the
    saved values of `extra` (same keys as given)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no .metadata)")
    state = _state(model, optimizer, ema, extra)
    saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    rng_key = f"rng_rank{_rank()}"
    if not any(k.startswith(rng_key + ".") for k in saved_keys):
        state.pop(rng_key)  # saved with fewer ranks: this rank starts from its seeded state
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng_key in state:
        torch.set_rng_state(state[rng_key]["cpu"])
        if "cuda" in state[rng_key] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state[rng_key]["cuda"])
    return {k: int(v) for k, v in state["trainer"].items()}
