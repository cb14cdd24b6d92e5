"""What the lent GPU machine can import, so the CPU rehearsal can be held to it.

The machine's image: the distributions below and everything they require; scripts/gpu_wheels.sh
adds its wheels. Every other distribution installed here (open_clip_torch, ftfy, wcwidth,
webdataset, braceexpand, DALI, ... whatever requirements.txt brought) is hidden from the
rehearsal by a meta-path finder installed through a sitecustomize.py on PYTHONPATH, which every
subprocess of the suite inherits; its metadata is hidden too (libraries probe optional packages
by their metadata, then import them). Over-inclusive on purpose (a requirement under any platform
marker counts as present), so what it hides is surely absent there.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ["torch", "triton", "torchvision", "numpy", "pillow", "pytest", "pytest-benchmark", "tqdm", "regex", "pyyaml",
         "safetensors", "timm", "torchmetrics", "pip", "setuptools"]
KNOWN_ABSENT = {"open_clip_torch": ["open_clip"], "ftfy": ["ftfy"], "wcwidth": ["wcwidth"],
                "webdataset": ["webdataset"], "braceexpand": ["braceexpand"], "nvidia-dali": ["nvidia.dali"]}
PROJECT = "flowtok-fast"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_list() -> list[str]:
    """The distribution names in scripts/gpu_wheels.sh's WHEELS=( ... ) array."""
    text = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    m = re.search(r"^WHEELS=\((.*?)^\)", text, re.S | re.M)
    assert m, "scripts/gpu_wheels.sh has no WHEELS=( ... ) array"
    entries = [w.strip("\"'") for line in m.group(1).splitlines() for w in line.split("#")[0].split()]
    return [norm(re.split(r"[=<>!~ ;\[]", e)[0]) for e in entries if e]


def _requires(dist) -> list[str]:
    out = []
    for req in dist.requires or []:
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        out.append(norm(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    return out


def blocked() -> tuple[list[str], list[str]]:
    """(module names, distribution names) installed here that the GPU machine will not have, found by
    a fresh interpreter: an import in this process can add to sys.path (setuptools adds its _vendor
    folder), and what it vendors (jaraco, more_itertools, ...) would then be blocked as strangers."""
    p = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120, check=True)
    modules, dists = json.loads(p.stdout)
    return modules, dists


def _blocked_here() -> tuple[list[str], list[str]]:
    installed = {norm(d.metadata["Name"]): d for d in md.distributions() if d.metadata["Name"]}
    wheels = set(wheel_list())
    allowed, todo = set(), [norm(n) for n in IMAGE] + sorted(wheels)
    while todo:
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        if name in installed:
            todo += _requires(installed[name])
    top = {}  # module -> distributions providing it
    for module, dists in md.packages_distributions().items():
        for d in dists:
            top.setdefault(module, set()).add(norm(d))
    blocked = {m for m, dists in top.items()
               if not (dists & allowed) and PROJECT not in dists and not m.startswith("_") and m.isidentifier()}
    dists = {d for d in installed if d not in allowed and d != PROJECT}
    for dist, modules in KNOWN_ABSENT.items():
        if norm(dist) not in wheels:
            blocked.update(modules)
            dists.add(norm(dist))
    return sorted(blocked), sorted(dists)


def blocked_modules() -> list[str]:
    return blocked()[0]


SITECUSTOMIZE = '''# written by tests/perf/gpu_image.py: the GPU machine's importable packages, enforced
import importlib.metadata as _md
import re
import sys

BLOCKED = {blocked!r}
BLOCKED_DISTS = {dists!r}
_discover = _md.Distribution.discover.__func__


def _visible(cls, **kwargs):
    # libraries probe optional packages by their metadata (torch: importlib.metadata.version("optree"))
    for d in _discover(cls, **kwargs):
        if re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower() not in BLOCKED_DISTS:
            yield d


_md.Distribution.discover = classmethod(_visible)


class _GpuImage:
    @staticmethod
    def find_spec(name, path=None, target=None):
        parts = name.split(".")
        if any(".".join(parts[:i]) in BLOCKED for i in range(1, len(parts) + 1)):
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine; "
                                      "add its wheel to scripts/gpu_wheels.sh)", name=name)
        return None


sys.meta_path.insert(0, _GpuImage)
'''


def write_sitecustomize(folder: Path) -> list[str]:
    modules, dists = blocked()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=set(modules), dists=set(dists)))
    return modules


if __name__ == "__main__":  # blocked(), in a fresh interpreter
    print(json.dumps(_blocked_here()))
