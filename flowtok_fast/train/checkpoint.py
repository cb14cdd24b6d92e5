"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a directory `<output_dir>/checkpoints/step_<N>` holding model, optimizer and EMA
(sharded as they live: DCP reshards on load, so the world size may change between runs), the
step, the data position, every rank's RNG states, the run's config (`train_config.json`) and each
rank's data-skip counts (`data_rank<R>.json`). It is written to a hidden temporary directory and
renamed into place once every rank has finished, so a crash mid-save never leaves a directory that
looks complete; leftovers of such a crash are removed at the next start (`remove_stale`).
Reading never unpickles without restriction (dcp_safe.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from flowtok_fast.checkpoint import CheckpointError, _atomic_write
from flowtok_fast.train import dcp_safe

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
CONFIG_FILE = "train_config.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.' and never match)."""
    root = checkpoints_dir(output_dir)
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_stale(output_dir: str | Path) -> list[Path]:
    """Delete the temporary directories of saves that never finished (a killed run); returns them."""
    stale = sorted(checkpoints_dir(output_dir).glob(".step_*.tmp"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


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


def _rank_file(rank: int) -> str:
    return f"data_rank{rank}.json"


def save(output_dir: str | Path, step: int, model, optimizer, ema, extra: dict[str, int], config: dict, keep: int = 2,
         rank_state: dict | None = None) -> Path:
    """Write checkpoint `step_<step>` (collective: every rank calls it). `rank_state`: this rank's
    JSON-able extras (the data-skip counts). Returns its path."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
    _barrier()
    with _quiet():
        dcp.save(_state(model, optimizer, ema, extra), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    if rank_state is not None:
        _atomic_write(tmp / _rank_file(_rank()), lambda p: Path(p).write_text(json.dumps(rank_state)))
    _barrier()
    if _rank() == 0:
        _atomic_write(tmp / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
        shutil.rmtree(final, ignore_errors=True)  # re-saving a step after a resume
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_metadata(path: str | Path):
    """The checkpoint's DCP metadata (restricted unpickling), after checking that the directory
    is complete: a CheckpointError naming the file otherwise."""
    path = Path(path)
    if not (path / dcp_safe.METADATA_FILE).is_file():
        what = "does not exist" if not path.exists() else f"has no {dcp_safe.METADATA_FILE}"
        raise CheckpointError(f"{path} is not a complete training checkpoint: it {what}")
    metadata = dcp_safe.read_metadata(path / dcp_safe.METADATA_FILE)
    dcp_safe.check_complete(path, metadata)
    return metadata


def read_config(path: str | Path) -> dict:
    """The run config saved with a checkpoint (train_config.json)."""
    f = Path(path) / CONFIG_FILE
    try:
        config = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing; {path} is not a complete training checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{f}: not readable JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{f}: expected a JSON object of config keys, got {type(config).__name__}")
    return config


def load_tensors(path: str | Path, state: dict) -> None:
    """dcp.load into `state` (in place) with the restricted reader and planner; any failure is a
    one-line CheckpointError naming the checkpoint."""
    path = Path(path)
    try:
        with _quiet():
            dcp.load(state, storage_reader=dcp_safe.SafeFileSystemReader(str(path)),
                     planner=dcp_safe.SafeLoadPlanner(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP's is a BaseException
        inner = dcp_safe.innermost(err)
        if isinstance(inner, CheckpointError):  # already names the file
            raise CheckpointError(str(inner)) from None
        raise CheckpointError(f"{path}: cannot load the checkpoint ({dcp_safe.short_reason(inner)})") from None


def load(path: str | Path, model, optimizer, ema, extra: dict[str, int]) -> tuple[dict[str, int], dict]:
    """Restore model, optimizer, EMA and this rank's RNG states in place from `path`; returns the
    saved values of `extra` (same keys as given) and this rank's JSON extras ({} if none)."""
    path = Path(path)
    saved_keys = read_metadata(path).state_dict_metadata
    state = _state(model, optimizer, ema, extra)
    rng_key = f"rng_rank{_rank()}"
    if not any(k.startswith(rng_key + ".") for k in saved_keys):
        state.pop(rng_key)  # saved with fewer ranks: this rank starts from its seeded state
    load_tensors(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng_key in state:
        torch.set_rng_state(state[rng_key]["cpu"])
        if "cuda" in state[rng_key] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state[rng_key]["cuda"])
    return {k: int(v) for k, v in state["trainer"].items()}, _read_rank_state(path)


def _read_rank_state(path: Path) -> dict:
    f = path / _rank_file(_rank())
    if not f.is_file():
        return {}
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring %s (%s)", f, err)
        return {}
    return state if isinstance(state, dict) else {}
