"""Everything that needs a GPU, in one command, for a lent H100 (torch 2.11 / triton 3.6
preinstalled, no internet); about 8 minutes. Writes OUT/gpu_suite.json and OUT/gpu_suite.md.

    python benchmarks/gpu_suite.py --out results/gpu_suite
    python benchmarks/gpu_suite.py --dry-run     # print the plan, run nothing (works on CPU)

Steps, each in a subprocess with its own time limit, skipped when the overall budget is spent:
 1. kernel tests on CUDA: pytest tests/kernels with TRITON_INTERPRET=0 (tests/conftest.py only
    sets it with setdefault, so the explicit 0 wins: kernels compile for the GPU);
 2. the CUDA tests of the static sampler (one CUDA graph; reduce-overhead; no host sync);
 3. end-to-end throughput of XL and H at 256 px, batch 64, bf16, 20 steps, CFG 2.0, every mode;
 4. a training step of XL and H at the largest per-GPU batch the planner predicts to fit
    (retried smaller on out-of-memory), with the planner's predicted peak memory beside the
    measured one; for H also with the planner's recompute choice;
 5. the per-op kernel benchmark benchmarks/kernels.py, if present.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGETS = {"XL": 113.0, "H": 90.0}  # images/s at 256 px, batch 64, bf16, 20 steps, CFG 2.0 (issue 5)
TRAIN_MFU_TARGET = 0.50


def cuda_env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", HF_HUB_OFFLINE="1")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / "results" / "inductor_cache"))
    return env


def plan_steps(out: Path, models=("XL", "H"), repeats: int = 3) -> list[dict]:
    steps = [
        {"name": "kernel tests", "cmd": [PY, "-m", "pytest", "-q", "tests/kernels"], "timeout": 120},
        {"name": "sampler CUDA tests", "cmd": [PY, "-m", "pytest", "-q", "tests/perf/test_fast_sampler.py", "-k", "cuda"],
         "timeout": 90},
    ]
    for m in models:
        steps.append({"name": f"throughput {m}", "timeout": 180, "cmd": [
            PY, "benchmarks/throughput.py", "--model", m, "--batch", "64", "--steps", "20", "--cfg", "2.0",
            "--resolution", "256", "--repeats", str(repeats), "--train-batch", "0", "--results", str(out / "throughput.jsonl")]})
    for m, policy in [(m, "none") for m in models] + [("H", None)] * ("H" in models):
        steps.append({"name": f"train {m} {policy or 'planner choice'}", "model": m, "policy": policy, "timeout": 90,
                      "train": True})
    if (ROOT / "benchmarks" / "kernels.py").exists():  # last: the end-to-end numbers matter more
        steps.append({"name": "kernel benchmark", "timeout": 60,
                      "cmd": [PY, "benchmarks/kernels.py", "--quick", "--results", str(out / "kernels.jsonl")]})
    return steps


def run(cmd: list[str], timeout: float) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=cuda_env(), capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        def text_of(b):  # bytes or str depending on the Python version
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        rc, text = "timeout", text_of(e.stdout) + text_of(e.stderr)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "tail": text[-3000:]}


# ------------------------------------------------------------------ training with the planner


def _train_prediction(model: str, policy: str, total_gib: float) -> dict:
    """The planner's single-GPU numbers: AdamW state (no EMA in the benchmark), measured
    activations, one recomputed block; `max_batch` leaves 2 GiB for the context and transients."""
    from flowtok_fast.perf import planner

    cfg = planner.get_config(model)
    params, block_params = planner._param_counts(cfg)
    acts = planner.activation_model(cfg, "reference", policy)
    base = planner.activation_model(cfg, "reference", "none")
    working = 0.0 if policy == "none" else base["per_sample_per_block"]

    def predicted(batch):
        return planner.memory_per_gpu(params=params, block_params=block_params, batch=batch,
                                      act_per_sample=acts["per_sample"], act_const=acts["const"],
                                      working_per_sample=working, sharding="ddp", gpus=1, reserve_bytes=0, ema=False)

    fixed = predicted(0)["total"]
    per_sample = acts["per_sample"] + working
    return {"predicted": predicted, "max_batch": planner.max_batch((total_gib - 2) * planner.GIB, fixed, per_sample)}


def _planner_choice(total_gib: float) -> str:
    from flowtok_fast.perf import planner

    p = planner.plan("H", 8192, 8, total_gib, impls=("reference",), shardings=("fsdp2",))
    return (p["choice"] or {"policy": "full"})["policy"]


def train_step(step: dict, out: Path, total_gib: float, deadline: float) -> dict:
    model = step["model"]
    policy = step["policy"] or _planner_choice(total_gib)
    pred = _train_prediction(model, policy, total_gib)
    batch = max(8, pred["max_batch"] // 8 * 8)
    result = {"model": model, "policy": policy, "planner_max_batch": pred["max_batch"], "attempts": []}
    for _ in range(3):
        if time.time() + 30 > deadline:
            break
        r = run([PY, "benchmarks/throughput.py", "--train-only", "--train-model", model, "--train-batch", str(batch),
                 "--recompute", policy, "--repeats", "3", "--results", str(out / "train.jsonl")],
                min(step["timeout"], deadline - time.time()))
        r["batch"] = batch
        result["attempts"].append(r)
        if r["rc"] == 0:
            rec = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()][-1]
            predicted = pred["predicted"](batch)["total"] / 2**30
            result.update(batch=batch, record=rec, predicted_peak_gib=predicted,
                          prediction_error=(predicted - rec["peak_mem_gib"]) / rec["peak_mem_gib"])
            return result
        if "out of memory" not in r["tail"].lower():
            break
        batch = max(8, int(batch * 0.75) // 8 * 8)
    return result


# ------------------------------------------------------------------ report


def _counts(tail: str) -> str:
    m = re.findall(r"(\d+ (?:passed|failed|skipped|error|errors|deselected))", tail)
    return ", ".join(m) if m else "see log"


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"# GPU suite: {env.get('device')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}, {env.get('time')}; "
             f"ceiling measured per run (bf16 8192^3 matmul).", "", "## Steps", "",
             "| step | result | seconds |", "|---|---|---|"]
    for s in summary["steps"]:
        res = s.get("rc")
        lines.append(f"| {s['name']} | {'ok' if res == 0 else res} {_counts(s.get('tail', '')) if 'test' in s['name'] else ''} "
                     f"| {s.get('seconds', '-')} |")
    lines += ["", "## Throughput (256 px, batch 64, bf16, 20 steps, CFG 2.0)", "",
              "| model | mode | img/s | spread | MFU | flow MFU | peak GiB | target |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["throughput"]:
        tgt = TARGETS.get(r["model"])
        lines.append(f"| {r['model']} | {r['mode']} | {r['images_per_s']:.1f} | {r['batch'] / r['seconds_max']:.1f}-"
                     f"{r['batch'] / r['seconds_min']:.1f} | {100 * r['mfu']:.1f}% | {100 * r['flow_mfu']:.1f}% | "
                     f"{r['peak_mem_gib']:.1f} | {'>= %g: %s' % (tgt, 'met' if r['images_per_s'] >= tgt else 'not met') if tgt else ''} |")
    lines += ["", "## Training step (one GPU, AdamW, bf16 autocast)", "",
              "| model | recompute | batch | samples/s | MFU | peak GiB measured | planner predicted | error |",
              "|---|---|---|---|---|---|---|---|"]
    for t in summary["train"]:
        if "record" not in t:
            lines.append(f"| {t['model']} | {t['policy']} | - | failed or skipped | | | | |")
            continue
        r = t["record"]
        lines.append(f"| {t['model']} | {t['policy']} | {t['batch']} | {r['samples_per_s']:.1f} | {100 * r['mfu']:.1f}% "
                     f"(target {100 * TRAIN_MFU_TARGET:.0f}%) | {r['peak_mem_gib']:.1f} | {t['predicted_peak_gib']:.1f} | "
                     f"{100 * t['prediction_error']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/gpu_suite", help="output folder")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole suite")
    ap.add_argument("--models", nargs="+", default=["XL", "H"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    steps = plan_steps(out, tuple(args.models), args.repeats)
    if args.dry_run:
        for s in steps:
            what = " ".join(s["cmd"]) if "cmd" in s else f"training step {s['model']} (recompute {s['policy'] or 'planner choice'})"
            print(f"[{s['timeout']:>4}s] {s['name']}: {what}")
        print(f"env: TRITON_INTERPRET=0; outputs: {out}/gpu_suite.json, {out}/gpu_suite.md")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_suite needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget
    dev = torch.device("cuda")
    total_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30
    summary = {"environment": throughput.environment(dev), "total_mem_gib": total_gib, "steps": [], "train": []}
    for s in steps:
        if time.time() + 20 > deadline:
            summary["steps"].append({"name": s["name"], "rc": "skipped: time budget"})
            continue
        print(f"== {s['name']}", file=sys.stderr, flush=True)
        if s.get("train"):
            t = train_step(s, out, total_gib, deadline)
            summary["train"].append(t)
            last = t["attempts"][-1] if t["attempts"] else {"rc": "skipped: time budget"}
            summary["steps"].append({"name": s["name"], **last})
        else:
            summary["steps"].append({"name": s["name"], **run(s["cmd"], min(s["timeout"], deadline - time.time()))})
    tp = out / "throughput.jsonl"
    summary["throughput"] = [json.loads(x) for x in tp.read_text().splitlines()] if tp.exists() else []
    kp = out / "kernels.jsonl"
    summary["kernels"] = [json.loads(x) for x in kp.read_text().splitlines()] if kp.exists() else []
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "gpu_suite.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
