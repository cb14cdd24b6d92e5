"""What a run of the example records beside its metrics: stage timings and throughput, where and
on what it ran (commit, threads, load, CPU), and digests of its results and of each stage's final
weights, so two runs can be compared digit for digit (same commit and machine: same digests)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("shapes")
REPO = Path(__file__).resolve().parents[2]
# results.json keys that differ between two identical runs (time, place, paths): left out of the results digest
VOLATILE = frozenset({"timings", "throughput", "machine", "provenance", "digests", "out", "export", "samples_png",
                      "output_dir", "tokenizer_weights", "samples_per_s_last"})


class Clock:
    """Wall time, process CPU time and the 1-minute load average per stage."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    @staticmethod
    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    @contextlib.contextmanager
    def stage(self, name: str):
        log.info(f"== {name}")
        w, c, l0 = time.perf_counter(), self.cpu(), os.getloadavg()[0]
        yield
        wall, cpu = time.perf_counter() - w, self.cpu() - c
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                             "load1_start": round(l0, 2), "load1_end": round(os.getloadavg()[0], 2)}
        log.info(f"== {name}: {wall:.1f} s wall, {cpu:.1f} s CPU")

    def total(self, names) -> float:
        return round(sum(self.stages[n]["wall_s"] for n in names if n in self.stages), 1)


class Throughput:
    """Samples per second of each stage's main loop (training steps x batch, images encoded,
    sampled or captioned): what tells a slower machine from a slower change."""

    def __init__(self):
        self.rates: dict[str, dict] = {}

    @contextlib.contextmanager
    def measure(self, name: str, samples: int | None = None):
        """`samples` known up front, or set later with `count[0] = n` on the yielded list."""
        count = [samples]
        t = time.perf_counter()
        yield count
        seconds = time.perf_counter() - t
        self.rates[name] = {"samples": count[0], "seconds": round(seconds, 1),
                            "samples_per_s": round(count[0] / seconds, 1) if seconds > 0 and count[0] else None}


def commit() -> dict:
    """The repository's HEAD and whether tracked files differ from it (None outside a git clone)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    """Where the run happens: what changes its speed (threads, load, CPU) and its numerics (CPU
    capability and BLAS code path: a chaotic training can end elsewhere on another CPU)."""
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "load_at_start": [round(x, 2) for x in os.getloadavg()]}


def provenance(argv: list[str]) -> dict:
    return {**commit(), "command": " ".join(["python -m examples.shapes.run", *argv])}


def weights_digest(*modules) -> str:
    """sha256 (first 16 hex) over the modules' state dicts: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        state = module.state_dict() if hasattr(module, "state_dict") else module
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    return weights_digest({"tensor": t})


def _stable(d):
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, (list, tuple)):
        return [_stable(v) for v in d]
    return d


def results_digest(results: dict) -> str:
    """sha256 (first 16 hex) of every result at full precision, less the VOLATILE keys."""
    text = json.dumps(_stable(results), sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


def rounded(d):
    if isinstance(d, dict):
        return {k: rounded(v) for k, v in d.items()}
    if isinstance(d, float):
        return round(d, 4)
    return d


def results_table(results: dict) -> str:
    """The headline numbers as a markdown table (the README's Results section is pasted from it),
    then the provenance, stage times, throughput and digests."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    rows = ["| direction | split | colour | shape | both right | everything right | other |", "|---|---|---|---|---|---|---|"]
    for name, ev in results.get("t2i", {}).get("eval", {}).items():
        other = "; ".join(f"CFG {c}: colour {pct(r['colour_accuracy'])}, shape {pct(r['shape_accuracy'])}"
                          for c, r in ev.get("other_cfg_scales", {}).items())
        rows.append(f"| t2i (CFG {results['t2i']['sampling']['cfg_scale']}) | {name} | {pct(ev.get('colour_accuracy'))} | "
                    f"{pct(ev.get('shape_accuracy'))} | {pct(ev.get('object_accuracy'))} | {pct(ev.get('image_accuracy'))} | {other} |")
    for name, ev in results.get("i2t", {}).get("eval", {}).items():
        other = "; ".join(f"CFG {c}: colour {pct(r['colour_accuracy'])}, shape {pct(r['shape_accuracy'])}"
                          for c, r in ev.get("other_cfg_scales", {}).items())
        bleu = f"BLEU-4 {ev['BLEU-4']:.3f}, exact match {pct(ev.get('exact_match'))}" if "BLEU-4" in ev else ""
        rows.append(f"| i2t (CFG {results['i2t']['captioning']['cfg_scale']}) | {name} | {pct(ev.get('colour_accuracy'))} | "
                    f"{pct(ev.get('shape_accuracy'))} | {pct(ev.get('object_accuracy'))} | {pct(ev.get('layout_accuracy'))} | "
                    f"{'; '.join(x for x in (bleu, other) if x)} |")
    t, p, m = results.get("timings", {}), results.get("provenance", {}), results.get("machine", {})
    rows.append("")
    rows.append(f"Commit {p.get('commit')}{' (with uncommitted changes)' if p.get('dirty') else ''}; "
                f"command `{p.get('command')}`; {m.get('torch_threads')} torch thread(s), load average "
                f"{m.get('load_at_start')} at the start, {m.get('load_at_end')} at the end; {m.get('cpu_model')} "
                f"({m.get('torch_cpu_capability')}), torch {m.get('torch')}.")
    rows.append("")
    rows.append(f"End to end (wall): t2i {t.get('t2i_end_to_end_s')} s, i2t {t.get('i2t_end_to_end_s')} s, "
                f"whole run {t.get('total_s')} s; stages: "
                + ", ".join(f"{k} {v['wall_s']} s" for k, v in t.get("stages", {}).items()))
    rows.append("")
    rows.append("Samples/s: " + ", ".join(f"{k} {v['samples_per_s']}" for k, v in results.get("throughput", {}).items()))
    rows.append("")
    rows.append("Digests: " + ", ".join(f"{k} {v}" for k, v in results.get("digests", {}).items()))
    return "\n".join(rows) + "\n"
