"""On-disk cache of the planner's measured activation models, so `plan` measures once per shape.

A measurement depends on the model shape, the ops implementation, the recompute policy, the
fit points, the torch version (autocast's dtype choices, what autograd saves) and our own code
(models, ops, kernels' fake implementations, the loss): the key holds all of them, the code as a
digest of those source files, so an edit or another torch re-measures instead of reusing a
stale answer. One JSON file, replaced atomically (temp file + os.replace); an unreadable or
unwritable cache is ignored (the planner then just measures).

Location: $FLOWTOK_CACHE_DIR, else $XDG_CACHE_HOME/flowtok_fast, else ~/.cache/flowtok_fast.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

VERSION = 2  # bump when the measurement method changes


def cache_file() -> Path:
    root = os.environ.get("FLOWTOK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flowtok_fast")
    return Path(root) / "activations.json"


@functools.cache
def source_digest() -> str:
    """sha256 over the source files a measurement runs through."""
    pkg = Path(__file__).resolve().parents[1]  # flowtok_fast/
    files = sorted(pkg.glob("models/*.py")) + [pkg / n for n in ("ops.py", "objective.py", "configs.py")]
    files += [pkg / "perf" / "flops.py", pkg / "perf" / "planner.py"]
    spec = importlib.util.find_spec("flowtok_fast.kernels")  # kernels/ via setup.py's package_dir
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            files += sorted(Path(loc).glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key(cfg, impl: str, policy: str, batches, depths) -> str:
    return json.dumps({"v": VERSION, "generator": dataclasses.asdict(cfg.generator),
                       "text_vae": dataclasses.asdict(cfg.text_vae), "impl": impl, "policy": policy,
                       "batches": list(batches), "depths": list(depths) if depths else None,
                       "torch": torch.__version__, "source": source_digest()}, sort_keys=True)


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def get(k: str) -> dict | None:
    hit = _load().get(k)
    return dict(hit) if isinstance(hit, dict) else None


def put(k: str, value: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load()
        data[k] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".activations.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
