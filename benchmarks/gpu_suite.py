"""Everything that needs a GPU, in one command of at most 540 s, for a lent H200 (torch 2.11 /
triton 3.6 preinstalled, no network); run it through scripts/gpu_suite.sh. Ordered by value:

  (a) CUDA kernel correctness: pytest tests/kernels, compiled kernels (TRITON_INTERPRET=0) at the
      real shapes (FLOWTOK_KERNEL_SHAPES=real: fresh seeds, NaN-poisoned outputs);
  (b) the CUDA-graph sampler against eager, and no host sync inside the loop (tests/perf);
  (c) throughput of XL and H at 256 px, batch 64, 20 steps, CFG 2.0, bf16: eager, fused and
      fused-graph first (each model also as a 1-step distilled student: one row per image, its
      images/s and per-stage split beside the 20-step CFG teacher's), then compiled-graph per model
      (the compile-heavy modes last), with MFU against the matmul and copy ceilings measured in the same run;
  (d) one training step of XL and H at the planner's batch for this card (benchmarks/gpu_plan.json,
      computed on a CPU by benchmarks/gpu_train_plan.py and carried), measured vs predicted peak;
  (e) the kernel benchmark benchmarks/kernels.py --quick (GB/s vs the copy ceiling, attention
      vs SDPA, the adaLN chain vs eager and torch.compile), one process per group of ops.

    python benchmarks/gpu_suite.py --dry-run      # the plan and its budgets (any machine)
    python benchmarks/gpu_suite.py --out DIR      # on the GPU
    python benchmarks/gpu_suite.py --rehearse     # the same plan on CPU: tiny shapes, short budgets

Every step is a subprocess in its own process group, killed as a group at its time limit (so
Inductor's compile workers die with it); a step may use the time earlier steps left unused,
never beyond the suite's end. The parent imports nothing but the standard library. Records are
JSON lines appended the moment each test, mode or case finishes: OUT/steps.jsonl (one per
step), tests.jsonl, throughput.jsonl, train.jsonl, kernels.jsonl; then OUT/gpu_suite.md, the
summary, is written and printed last.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report  # noqa: E402  (standard library only)

PY = sys.executable
SCRATCH = Path(tempfile.gettempdir()) / "flowtok_gpu_suite"  # caches: not in OUT, whose files travel back
TOTAL_BUDGET = 540  # seconds: one device command is at most 600 s, the install takes the rest
# benchmarks/kernels.py --ops, grouped so that a timeout loses at most one group (most valuable first)
KERNEL_GROUPS = [
    ["attention", "attention_rope"],
    ["ln_modulate", "gated_residual", "gated_residual_ln_modulate", "swiglu", "gelu_tanh", "cfg_euler_step_"],
    ["modulated_linear", "gated_residual_modulated_linear", "gelu_linear", "swiglu_linear"],
]


@dataclass
class Step:
    name: str
    budget: float  # planned seconds
    cmds: list  # argv lists, run in order (a kernel benchmark group each)
    env: dict = field(default_factory=dict)
    train: dict | None = None  # the planner's entry: a training step, retried smaller on out-of-memory


# most valuable first, in case the step runs out of time; test_gpu_compile (sm_80/sm_90 PTX) and
# test_cuda_default_device (a fake CUDA device) are CPU-side proofs that CI runs
KERNEL_TEST_ORDER = ("attention", "adaln", "swiglu", "fused_linear", "flow_step", "determinism", "integration",
                     "opcheck", "benchmarks")


def plan_steps(out: Path, rehearse: bool, plan_file: Path) -> list[Step]:
    """The ordered steps with their planned seconds (sum <= TOTAL_BUDGET)."""
    tests = {"FLOWTOK_SUITE_RECORDS": str(out / "tests.jsonl")}
    pytest = [PY, "-m", "pytest", "-q", "-p", "benchmarks.pytest_records", "-o", "cache_dir=" + str(SCRATCH / "pytest")]
    tp = [PY, "benchmarks/throughput.py", "--results", str(out / "throughput.jsonl"), "--train-batch", "0"]
    if rehearse:  # tiny shapes, the interpreter, short budgets; CUDA-only modes and tests skip with their reason
        kernel_env = {"TRITON_INTERPRET": "1", "FLOWTOK_KERNEL_SHAPES": "ci"}
        kernel_tests = ["tests/kernels/test_flow_step.py", "-k", "test_euler_step or formula"]
        models, big = ["tiny"], ["tiny"]
        tp += ["--batch", "1", "--steps", "2", "--repeats", "1", "--resolution", "256", "--ceiling-size", "256"]
        groups, kb = [["cfg_euler_step_"]], ["--ops"]
        budgets = dict(a=40, b=40, c1=40, c2=30, d=30, e=40)
    else:
        kernel_env = {"TRITON_INTERPRET": "0", "FLOWTOK_KERNEL_SHAPES": "real"}
        kernel_tests = [f"tests/kernels/test_{name}.py" for name in KERNEL_TEST_ORDER]
        models, big = ["XL", "H"], ["XL", "H"]
        tp += ["--batch", "64", "--steps", "20", "--cfg", "2.0", "--resolution", "256", "--repeats", "3"]
        groups, kb = KERNEL_GROUPS, ["--quick", "--ops"]
        budgets = dict(a=125, b=40, c1=95, c2=80, d=35, e=45)  # (a) compiles ~60 kernel variants first
    steps = [
        Step("(a) kernel tests", budgets["a"], [pytest + kernel_tests],
             {**tests, **kernel_env, "FLOWTOK_SUITE_STEP": "kernel tests"}),
        Step("(b) CUDA-graph sampler tests", budgets["b"],
             [pytest + ["tests/perf/test_fast_sampler.py", "-k", "cuda" if rehearse else "cuda or host_sync"]],
             {**tests, "FLOWTOK_SUITE_STEP": "sampler tests"}),
        # each model also as a 1-step distilled student (one row per image): its images/s beside the teacher's
        Step(f"(c) throughput {'+'.join(models)}: eager, fused, fused-graph; 1-step students", budgets["c1"],
             [tp + ["--model", *models, "--modes", "eager", "fused", "fused-graph", "--student-steps", "1"]]),
    ]
    for m in dict.fromkeys(big):
        steps.append(Step(f"(c) throughput {m}: compiled-graph", budgets["c2"], [tp + ["--model", m, "--modes", "graph"]]))
    entries = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    for m in dict.fromkeys(big):
        entry = entries.get(m)
        if entry is None:
            steps.append(Step(f"(d) train {m}", budgets["d"], [],
                              train={"missing": f"{plan_file} has no entry for {m}: run benchmarks/gpu_train_plan.py"}))
            continue
        if rehearse:  # tiny batch, reference ops: the Triton kernels on CPU would run in the interpreter
            entry = dict(entry, batch=min(entry["batch"], 2), ops="reference")
        steps.append(Step(f"(d) train {m}", budgets["d"] + 5 * (m == "H"), [], train=entry))
    steps.append(Step("(e) kernel benchmark", budgets["e"],
                      [[PY, "benchmarks/kernels.py", *kb, *g, "--results", str(out / "kernels.jsonl")] for g in groups]))
    return steps


def train_cmd(entry: dict, batch: int, out: Path, rehearse: bool) -> list[str]:
    return [PY, "benchmarks/throughput.py", "--train-only", "--train-model", entry["model"], "--train-batch", str(batch),
            "--train-ops", entry["ops"], "--recompute", entry["policy"], "--repeats", "1" if rehearse else "3",
            "--results", str(out / "train.jsonl"), *(["--ceiling-size", "256"] if rehearse else [])]


# ------------------------------------------------------------------ running one command


def run_group(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run `cmd` in a new process group, stream its output, kill the whole group at `timeout`."""
    t0 = time.time()
    tail = collections.deque(maxlen=60)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="replace", start_new_session=True)

    def pump():
        for line in p.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out, rc = True, "timeout"
    _kill_group(p)  # also after a normal exit: no compile worker outlives its step
    reader.join(timeout=5)
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t0, 1), "tail": "".join(tail)[-3000:]}


def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM:
            time.sleep(0.2)  # let the group's other members go too


# ------------------------------------------------------------------ the suite


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def run_step(step: Step, out: Path, env: dict, deadline: float, rehearse: bool) -> dict:
    """Run one step until its commands end or `deadline`; the step's record."""
    runs = []
    if step.train is not None:
        if "missing" in step.train:
            return {"rc": "skipped", "reason": step.train["missing"], "runs": runs}
        batch = step.train["batch"]
        for _ in range(3):  # out of memory: 3/4 of the batch, twice
            r = run_group(train_cmd(step.train, batch, out, rehearse), env, deadline - time.time())
            runs.append({**r, "batch": batch})
            if r["rc"] == 0 or r["timed_out"] or "out of memory" not in r["tail"].lower() or time.time() + 10 > deadline:
                break
            batch = max(8, int(batch * 0.75) // 8 * 8)
            append(out / "train.jsonl", {"benchmark": "train_oom", "model": step.train["model"], "batch": runs[-1]["batch"]})
    else:
        for cmd in step.cmds:
            if time.time() + 5 > deadline:
                runs.append({"rc": "skipped", "reason": "no time left in this step", "cmd": " ".join(cmd[1:])})
                continue
            runs.append({**run_group(cmd, env, deadline - time.time()), "cmd": " ".join(cmd[1:])})
    failed = [r for r in runs if r["rc"] not in (0, "skipped")]
    return {"rc": failed[0]["rc"] if failed else (0 if runs else "skipped"), "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "results/gpu_suite", help="output folder")
    ap.add_argument("--plan-file", default=str(ROOT / "benchmarks" / "gpu_plan.json"),
                    help="the training plan carried from a CPU (benchmarks/gpu_train_plan.py)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its budgets, run nothing")
    ap.add_argument("--rehearse", action="store_true", help="the same plan on CPU: tiny shapes, short budgets")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    steps = plan_steps(out, args.rehearse, Path(args.plan_file))
    total = sum(s.budget for s in steps)
    if args.dry_run:
        for s in steps:
            what = "; ".join(" ".join(c[1:]) for c in s.cmds) if s.cmds else (
                f"benchmarks/throughput.py --train-only at {s.train.get('batch')} ({s.train.get('ops')} ops, recompute "
                f"{s.train.get('policy')})" if "missing" not in s.train else s.train["missing"])
            print(f"[{s.budget:>4.0f} s] {s.name}: {what}")
        print(f"total planned: {total:.0f} s (limit {TOTAL_BUDGET} s); kernels compiled (TRITON_INTERPRET=0) unless "
              f"--rehearse; outputs in {out}: steps.jsonl tests.jsonl throughput.jsonl train.jsonl kernels.jsonl gpu_suite.md")
        return 0 if total <= TOTAL_BUDGET else 1
    out.mkdir(parents=True, exist_ok=True)
    # compiled kernels on the GPU (tests/conftest.py only defaults TRITON_INTERPRET to 1), the
    # interpreter in the rehearsal
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TRITON_INTERPRET="1" if args.rehearse else "0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(SCRATCH / "inductor"))
    start = time.time()
    planned_end = start
    for s in steps:
        planned_end += s.budget  # time a step leaves unused goes to the next ones
        print(f"\n== {s.name} (planned {s.budget:.0f} s, may use {planned_end - time.time():.0f} s)", flush=True)
        t0 = time.time()
        r = run_step(s, out, {**env, **s.env}, planned_end, args.rehearse)
        record = {"benchmark": "step", "step": s.name, "budget_s": s.budget, "seconds": round(time.time() - t0, 1),
                  "elapsed_s": round(time.time() - start, 1), **r}
        append(out / "steps.jsonl", record)
    plan_file = Path(args.plan_file)
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    md = gpu_report.markdown(out, total, rehearse=args.rehearse, plan=plan)
    (out / "gpu_suite.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
