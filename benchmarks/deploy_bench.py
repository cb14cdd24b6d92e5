"""Deployment benchmark, in one run: cold start (process start -> first image) of `--mode compile`
vs an exported package, and steady-state throughput of the package vs the compiled pipeline and
vs the reference sampler (the eager pipeline: flow.sample on the reference ops, always fp32).

    python benchmarks/deploy_bench.py --config tiny --batch 2 --steps 4 --threads 1
    python benchmarks/deploy_bench.py --config B --batch 2 --steps 10 --threads 1 --repeats 3
    python benchmarks/deploy_bench.py --config B --dtype bf16 --no-cold-start   # bf16 package vs fp32 reference

Cold start: a fresh Python process each, timed from outside (spawn -> exit after the first image
is made): the compile child gets an empty TORCHINDUCTOR_CACHE_DIR (a first start; with a warm
cache it is faster, see `compile_warm_cache_s`), the package child loads the package. The export
itself is timed too (a one-off cost per model, batch and settings). Steady state: the three
pipelines on the same weights, interleaved, best of --repeats each, by wall and by CPU time
(with a --dtype other than fp32 also the eager sampler in that dtype: compiled vs eager there). Targets (issue 12): cold start
with the package >= 10x faster; package throughput >= 0.95x the compiled pipeline's; B on CPU, the
bf16 package >= 2x the fp32 reference sampler (needs a CPU with native bf16: see --dtype auto).
The result (with the commit, threads and the load average at each phase) is printed as JSON and
written to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red bicycle by a lake", "two cats on a sofa", "a lighthouse at dusk", "a bowl of fruit"]

# each child prints where its time went (the interpreter's own start is the wall time minus these);
# the text tokenizer is loaded with the imports, the same in both
CHILD_IMPORTS = """
import time; t0 = time.perf_counter()
import json, torch
from flowtok_fast.models.text import tokenize
tokenize(["warm"])
torch.set_num_threads({threads})
t1 = time.perf_counter()
"""
CHILD_COMPILE = CHILD_IMPORTS + """
from flowtok_fast.pipeline import FlowTokPipeline
from flowtok_fast.deploy.dtype import DTYPES
pipe = FlowTokPipeline.random({config!r}, device="cpu", sampler_mode="compile", dtype=DTYPES[{dtype!r}])
t2 = time.perf_counter()
pipe({prompts!r}, steps={steps}, cfg_scale={cfg}, seed=0)
t3 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "model_s": t2 - t1, "first_image_s": t3 - t2}}))
"""
CHILD_PACKAGE = CHILD_IMPORTS + """
from flowtok_fast.deploy.package_pipeline import PackagePipeline
pipe = PackagePipeline.load({package!r})
t2 = time.perf_counter()
pipe({prompts!r}, seed=0)
t3 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2}}))
"""


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cold_start(code: str, env: dict) -> dict:
    """{"total_s": spawn -> exit, the child's own phases, and "cpu_s": the CPU time of the child and
    the compile workers it waited for (on a loaded machine the wall times are noise)}."""
    t0, c0 = time.perf_counter(), _children_cpu_s()
    done = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    total, cpu = time.perf_counter() - t0, _children_cpu_s() - c0
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    return {"total_s": round(total, 2), "cpu_s": round(cpu, 2), **{k: round(v, 2) for k, v in phases.items()},
            "interpreter_s": round(total - sum(phases.values()), 2)}


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    try:
        return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def steady_state(compiled, package, reference, prompts, steps, cfg, repeats: int, eager=None) -> dict:
    """Interleaved timing (A B C A B C ...) of the pipelines (reference: None to leave it out; eager:
    the eager sampler in the run's dtype, when that is not the reference's fp32), after a warm-up
    call each: images per second by wall time and by CPU time (process_time: with one thread, the
    machine's other load does not count; on a loaded machine the wall times are noise)."""
    run = {"compiled": lambda: compiled(prompts, steps=steps, cfg_scale=cfg, seed=0),
           "package": lambda: package(prompts, seed=0)}
    if eager is not None:
        run["eager"] = lambda: eager(prompts, steps=steps, cfg_scale=cfg, seed=0)
    if reference is not None:
        run["reference"] = lambda: reference(prompts, steps=steps, cfg_scale=cfg, seed=0)
    for f in run.values():
        f()
    times = {k: [] for k in run}
    cpu = {k: [] for k in run}
    for _ in range(repeats):
        for name, f in run.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    best, best_cpu = {k: min(v) for k, v in times.items()}, {k: min(v) for k, v in cpu.items()}
    out = {"images_per_s": {k: len(prompts) / v for k, v in best.items()},
           "images_per_cpu_s": {k: len(prompts) / v for k, v in best_cpu.items()},
           "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
           "cpu_seconds": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
           "package_vs_compiled": best["compiled"] / best["package"],
           "by_cpu_time": {"package_vs_compiled": best_cpu["compiled"] / best_cpu["package"]}}
    if eager is not None:
        out["compiled_vs_eager"] = best["eager"] / best["compiled"]
        out["by_cpu_time"]["compiled_vs_eager"] = best_cpu["eager"] / best_cpu["compiled"]
    if reference is not None:
        out["package_vs_reference"] = best["reference"] / best["package"]
        out["compiled_vs_reference"] = best["reference"] / best["compiled"]
        for name in run:
            if name != "reference":
                out["by_cpu_time"][f"{name}_vs_reference"] = best_cpu["reference"] / best_cpu[name]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--flow", default="step", choices=("step", "loop"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold", choices=("all", "empty", "package", "none"), default="all",
                   help="cold starts to measure: package and compile (empty and warm inductor cache), package and "
                        "compile with an empty cache, package only, none")
    p.add_argument("--no-cold-start", dest="cold", action="store_const", const="none", help="same as --cold none")
    p.add_argument("--no-steady-state", action="store_true", help="leave the steady-state comparison out")
    p.add_argument("--keep-package", help="export into this directory and keep it; reused when it holds a package")
    p.add_argument("--no-reference", action="store_true", help="leave the eager fp32 reference sampler out")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from flowtok_fast.deploy.dtype import cpu_has_native_bf16, dtype_name, resolve_dtype
    from flowtok_fast.deploy.export import export_package
    from flowtok_fast.deploy.manifest import cpu_build_entry
    from flowtok_fast.deploy.package_pipeline import PackagePipeline
    from flowtok_fast.pipeline import FlowTokPipeline

    torch.set_num_threads(args.threads)
    dtype, why = resolve_dtype(args.dtype, "cpu")
    print(why)
    prompts = PROMPTS[: args.batch] if args.batch <= len(PROMPTS) else [PROMPTS[0]] * args.batch
    settings = dict(config=args.config, threads=args.threads, steps=args.steps, cfg=args.cfg, prompts=prompts,
                    dtype=dtype_name(dtype))
    loads, started_at = {"start": load_average()}, commit()  # the code measured: HEAD when the run starts
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(args.keep_package or Path(tmp) / "pkg")
        compiled = FlowTokPipeline.random(args.config, device="cpu", sampler_mode="compile", dtype=dtype)
        export_s = None
        if (pkg / "manifest.json").is_file():  # --keep-package from an earlier run: checked, not rebuilt
            PackagePipeline.load(pkg, batch=args.batch, dtype=dtype).check_options(steps=args.steps, cfg_scale=args.cfg)
            print(f"export: reusing {pkg}", flush=True)
        else:
            t0 = time.perf_counter()
            export_package(compiled, pkg, args.batch, args.steps, args.cfg, dtype=dtype, flow_mode=args.flow)
            export_s = time.perf_counter() - t0
            print(f"export: {export_s:.1f} s", flush=True)
        loads["export"] = load_average()
        sizes = {f.name: f.stat().st_size for f in sorted(pkg.iterdir())}

        cold = None
        if args.cold != "none":
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
            fresh = dict(env, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor-cache"))
            cold = {"package": cold_start(CHILD_PACKAGE.format(package=str(pkg), **settings), env)}
            if args.cold in ("all", "empty"):
                cold["compile"] = cold_start(CHILD_COMPILE.format(**settings), fresh)
                cold["package_speedup"] = cold["compile"]["total_s"] / cold["package"]["total_s"]
                cold["package_speedup_cpu"] = cold["compile"]["cpu_s"] / cold["package"]["cpu_s"]
            if args.cold == "all":
                cold["compile_warm_cache"] = cold_start(CHILD_COMPILE.format(**settings), fresh)
                cold["package_speedup_vs_warm_cache"] = cold["compile_warm_cache"]["total_s"] / cold["package"]["total_s"]
            loads["cold_start"] = load_average()
            for name in ("package", "compile", "compile_warm_cache"):
                if name in cold:
                    print(f"cold start {name}: {cold[name]}", flush=True)
            if "package_speedup" in cold:
                print(f"cold start (process start -> first image): package {cold['package_speedup']:.1f}x faster "
                      f"than compile with an empty inductor cache ({cold['package_speedup_cpu']:.1f}x by CPU time)" + (
                          f", {cold['package_speedup_vs_warm_cache']:.1f}x than with a warm one"
                          if "package_speedup_vs_warm_cache" in cold else ""), flush=True)
        if args.no_steady_state:
            steady = None
        else:
            # the reference sampler on the same weights: eager flow.sample, reference ops, fp32
            reference = None if args.no_reference else FlowTokPipeline(
                compiled.config, compiled.clip, compiled.generator, compiled.tokenizer, device="cpu", dtype=torch.float32)
            # the eager sampler in the run's dtype: compiled vs eager in the same dtype (fp32: the reference)
            eager = None if dtype == torch.float32 else FlowTokPipeline(
                compiled.config, compiled.clip, compiled.generator, compiled.tokenizer, device="cpu", dtype=dtype)
            steady = steady_state(compiled, PackagePipeline.load(pkg), reference, prompts, args.steps, args.cfg,
                                  args.repeats, eager)
            loads["steady_state"] = load_average()
            ips = steady["images_per_s"]
            line = (f"steady state: compiled {ips['compiled']:.3g} images/s, package {ips['package']:.3g} images/s: "
                    f"package/compiled = {steady['package_vs_compiled']:.2f}x")
            if reference is not None:
                line += (f"; reference sampler (eager fp32) {ips['reference']:.3g} images/s: "
                         f"package/reference = {steady['package_vs_reference']:.2f}x")
            print(line, flush=True)
            print("by CPU time: " + ", ".join(f"{k} {v:.2f}x" for k, v in steady["by_cpu_time"].items()), flush=True)
    result = {"settings": {**settings, "batch": args.batch, "flow": args.flow, "repeats": args.repeats,
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "cpu_native_bf16": cpu_has_native_bf16(), "commit": started_at,
                           "cpu": cpu_build_entry()["model"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "export_s": export_s, "package_bytes": sizes, "cold_start": cold, "steady_state": steady, "load_1min": loads}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
