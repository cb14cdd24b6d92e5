"""End-to-end text-to-image throughput, sampler modes compared in one run, and a training step.

    python benchmarks/throughput.py                        # CPU default: tiny and B at batch 1
    python benchmarks/throughput.py --model XL H --batch 64 # a GPU (the default there)

Random weights, made on the device (speed does not depend on them), and random CLIP token ids
(the host-side BPE tokenizer is not timed, and open_clip need not be installed). Modes (--modes,
measured in the order given):
    eager            reference ops, the pipeline's sampler (flow.sample)
    fused            the Triton kernels, the pipeline's sampler                      [CUDA]
    compiled         static sampler (fast_sampler.py), torch.compile'd generator forward and
                     decoder (on a CPU both with frozen weights), as `--mode compile` runs them
    graph            compiled + the whole N-step loop as ONE CUDA graph             [CUDA]
    fused-graph      Triton kernels, no Inductor, one CUDA graph                    [CUDA]
    reduce-overhead  torch.compile(mode="reduce-overhead") forward                  [CUDA]
    package          an AOTInductor package (flowtok-fast export) of the same model, exported
                     once per run into a temporary directory (export_s, reported apart) and
                     loaded (load_s); only when asked for: `--modes compiled package`
The modes and their timing live in benchmarks/throughput_modes.py. --dtype auto (the default)
is bf16 on CUDA and fp32 on every CPU (flowtok_fast/deploy/dtype.py; --dtype bf16 opts in); it is printed.
Each stage (CLIP, text VAE, flow loop, decoder) is timed separately after a warm-up; the median
batch time over --repeats is reported with its spread (min-max images/s). FLOPs per image come
from flowtok_fast/perf/flops.py (FlopCounterMode: 2 FLOPs per multiply-accumulate of matmuls and
attention); MFU divides the achieved FLOP rate by a ceiling MEASURED here on the same device, in
the dtype that ran: a large matmul (8192^3 on GPU, 2048^3 on CPU; its best repeat); the device-to-device copy
bandwidth is measured beside it (the memory ceiling). The training step (--train-batch)
runs forward + backward of the generator with the FlowTok objective (flow + alignment + KL) and
an AdamW step on random latents and CLIP features; MFU counts model FLOPs (no recomputation).
One JSON record per configuration (a skipped one with its reason) is appended to --results the
moment it is measured, so a run stopped half-way keeps what it measured; a table is printed.
A one-line warning says when the load average exceeds the core count (timings then are not
the machine's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowtok_fast import onednn_linear, ops  # noqa: E402
from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS, get_config  # noqa: E402
from flowtok_fast.perf import flops  # noqa: E402
from flowtok_fast.pipeline import FlowTokPipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when loaded by path
# the modes and their timing; re-exported: tests and benchmarks/serve_load.py use them from here
from throughput_modes import (DEFAULT_MODES, MODES, STAGES, _peak_gib, _peak_reset, _sync, encode_ids,  # noqa: E402,F401
                              run_mode, skip_reason, time_stages, token_ids)

def load_warning(state: dict) -> None:
    """One line on stderr, once per run, when the 1-minute load average exceeds the core count:
    timings on an oversubscribed machine are not the device's (OpenMP threads wait on each other)."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this platform
        return
    if load > cores and not state.get("warned"):
        state["warned"] = True
        print(f"warning: load average {load:.1f} exceeds the {cores} cores: other jobs compete for this machine, "
              "timings are lower and noisier than the device allows", file=sys.stderr, flush=True)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    import triton

    return {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def measure_ceiling(device: torch.device, repeats: int = 5, n: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """The matmul rate this device reaches in `dtype` (default: bf16 on CUDA, fp32 on CPU), 8192^3
    on CUDA, 2048^3 on CPU: the best repeat (a ceiling; on a loaded machine the median sinks below
    what a model run can reach in a quiet moment, and MFU would exceed 1); on a CPU the faster of
    torch's matmul (MKL) and oneDNN's, which compile mode uses (2-3x MKL on AMD EPYC in fp32)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    matmuls = {"torch": lambda: a @ b}  # MKL on a CPU
    if device.type == "cpu" and onednn_linear.available():  # compile mode's fp32 GEMMs: oneDNN, not MKL
        matmuls["onednn"] = lambda: onednn_linear.onednn_linear(a, b, None)
    rates = {}
    for library, matmul in matmuls.items():
        for _ in range(2):
            matmul()
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                matmul()
            _sync(device)
            times.append((time.perf_counter() - t0) / inner)
        rates[library] = 2 * n**3 / min(times) / 1e12
    return {"ceiling_tflops": max(rates.values()), "ceiling_matmul": f"{str(dtype)[6:]} {n}^3",
            "matmul_tflops_by_library": rates}


def measure_copy_ceiling(device: torch.device, repeats: int = 5, mib: int | None = None) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second, median): the memory
    traffic ceiling. 1 GiB on CUDA (far beyond L2), 64 MiB on CPU."""
    n = (mib or (1024 if device.type == "cuda" else 64)) * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"ceiling_copy_gbps": 2 * src.numel() * 4 / statistics.median(times) / 1e9,
            "ceiling_copy": f"fp32 {n * 4 // 2**20} MiB device-to-device"}


def bench_inference(model: str, modes: list[str], batch: int, steps: int, cfg: float, resolution: int, repeats: int,
                    device: str | None, ceiling: dict, env: dict, dtype: torch.dtype | None = None,
                    package: str | None = None, student_steps: int | None = None) -> list[dict]:
    records = []
    config = get_config(model, resolution)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if all(skip_reason(m, dev) for m in modes):  # nothing to measure: no model to build
        for mode in modes:
            records.append({"benchmark": "skipped", "model": config.name, "mode": mode, "reason": skip_reason(mode, dev)})
            save(records[-1])
        return records
    torch.manual_seed(0)
    with dev:  # random weights made on the device: a 1B-parameter init on the host takes a while
        parts = FlowTokPipeline.build(config)
    pipe = FlowTokPipeline(config, *parts, device=dev, dtype=dtype)
    runs = [(pipe, steps, cfg, False)]
    if student_steps:  # the same network as a few-step student: one row per image, guidance built in
        from flowtok_fast.train.distill import make_student

        student = FlowTokPipeline(config, parts[0], make_student(parts[1], config.text_vae), parts[2], device=dev, dtype=dtype)
        runs.append((student, student_steps, 1.0, True))
    for pipe, steps, cfg, is_student in runs:
        records += _bench_modes(pipe, config, model, modes, batch, steps, cfg, repeats, ceiling, env, package, is_student)
    return records


def _bench_modes(pipe, config, model: str, modes: list[str], batch: int, steps: int, cfg: float, repeats: int,
                 ceiling: dict, env: dict, package: str | None, is_student: bool) -> list[dict]:
    records = []
    e2e = flops.end_to_end(config, steps, cfg)
    for mode in modes:
        reason = skip_reason(mode, pipe.device)
        if reason:
            records.append({"benchmark": "skipped", "model": config.name, "mode": mode, "reason": reason})
            save(records[-1])
            continue
        print(f"measuring {model} {mode}{' student' if is_student else ''} ({steps} steps, cfg {cfg:g}) ...",
              file=sys.stderr, flush=True)
        load_warning(_LOAD)
        r = run_mode(pipe, mode, batch, steps, cfg, repeats, package)
        load_warning(_LOAD)
        achieved = e2e["total"] * r["images_per_s"]
        flow_rate = e2e["flow"] * batch / r["stages_s"]["flow"]
        records.append({
            "benchmark": "throughput", "model": config.name, "resolution": config.tokenizer.resolution, "batch": batch,
            "steps": steps, "cfg": cfg, "student": is_student, "dtype": str(pipe.dtype).removeprefix("torch."), **r, **env, **ceiling,
            "flops_per_image": e2e["total"], "flops_per_image_stages": {st: e2e[st] for st in STAGES},
            "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (ceiling["ceiling_tflops"] * 1e12), "flow_mfu": flow_rate / (ceiling["ceiling_tflops"] * 1e12),
        })
        save(records[-1])  # now: a later mode that times out or crashes loses nothing measured
    return records


def _objective(generator):
    try:
        from flowtok_fast.objective import FlowTokObjective
    except ImportError:  # not there yet: the same loss terms from perf/flops.py
        return lambda feats, z: flops.train_loss(generator, feats, z)
    objective = FlowTokObjective(generator)
    return lambda feats, z: objective(feats, z)["loss"]


def bench_train(model: str, batch: int, repeats: int, device: str | None, impl: str, recompute: str,
                ceiling: dict, env: dict) -> dict:
    """Samples/s and peak memory of one training step: forward + backward + AdamW, fp32 master
    weights, bf16 autocast on CUDA, fp32 on CPU."""
    from flowtok_fast.models.generator import FlowTokGenerator
    from flowtok_fast.perf.planner import apply_recompute

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = get_config(model)
    torch.manual_seed(0)
    with dev:  # initialise on the device: a 1B-parameter init on the host takes a while
        gen = FlowTokGenerator(config.generator, config.text_vae).train()
    ops.use(gen, impl)
    apply_recompute(gen, recompute)
    loss_fn = _objective(gen)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.03,
                            **({"fused": True} if dev.type == "cuda" else {}))
    amp = dev.type == "cuda"
    feats = torch.randn(batch, NUM_TOKENS, config.text_vae.width, device=dev)
    z_img = torch.randn(batch, NUM_TOKENS, TOKEN_CHANNELS, device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(feats, z_img)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(f"measuring {model} training step (batch {batch}, ops {impl}, recompute {recompute}) ...", file=sys.stderr, flush=True)
    load_warning(_LOAD)
    _peak_reset(dev)
    step()  # warm-up: allocator, optimizer state
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    model_flops = flops.train_flops(config)
    return {"benchmark": "train", "model": config.name, "batch": batch, "ops": impl, "recompute": recompute,
            "dtype": "bfloat16 autocast" if amp else "float32", "samples_per_s": batch / med, "seconds_median": med,
            "seconds_min": min(times), "seconds_max": max(times), "repeats": repeats, "peak_mem_gib": _peak_gib(dev),
            "train_flops_per_sample": model_flops, "mfu": model_flops * batch / med / (ceiling["ceiling_tflops"] * 1e12),
            **env, **ceiling}


_LOAD: dict = {}  # load_warning's state: warned once per run
_RESULTS: list[str] = []  # the JSON lines file of this run (main sets it)


def save(record: dict) -> None:
    """Append one record to the results file at once (flushed), skipped modes included."""
    if _RESULTS:
        with open(_RESULTS[0], "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def print_table(records: list[dict]) -> None:
    inf = [r for r in records if r["benchmark"] == "throughput"]
    if inf:
        print(f"{'model':>6} {'res':>4} {'batch':>5} {'steps':>5} {'mode':>15} {'img/s':>8} {'spread':>14} {'MFU':>6} "
              f"{'peak GiB':>8} " + " ".join(f"{s:>9}" for s in STAGES))
        for r in inf:
            spread = f"{r['batch'] / r['seconds_max']:.3g}-{r['batch'] / r['seconds_min']:.3g}"
            split = " ".join(f"{100 * r['stages_s'][s] / r['seconds_median']:8.1f}%" for s in STAGES)
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{r['model']:>6} {r['resolution']:>4} {r['batch']:>5} {r['steps']:>5} {r['mode']:>15} "
                  f"{r['images_per_s']:8.3g} {spread:>14} {100 * r['mfu']:5.1f}% {peak:>8} {split}")
        # every mode against the eager reference path of the same model, measured in this run
        eager = {r["model"]: r["images_per_s"] for r in inf if r["mode"] == "eager" and not r.get("student")}
        for r in inf:
            if r["mode"] != "eager" and r["model"] in eager and not r.get("student"):
                print(f"{r['model']} {r['mode']} vs eager: x{r['images_per_s'] / eager[r['model']]:.2f}")
        # a few-step student against the multi-step CFG teacher, same model and mode
        teacher = {(r["model"], r["mode"]): r for r in inf if not r.get("student")}
        for r in inf:
            t = teacher.get((r["model"], r["mode"])) if r.get("student") else None
            if t:
                shares = ", ".join(f"{s} {100 * r['stages_s'][s] / r['seconds_median']:.0f}%" for s in STAGES)
                # what arithmetic allows: the FLOP ratio, and the ratio were the student's flow free
                # (the decoder, CLIP and text VAE are the same network in both)
                rest = r["flops_per_image"] - r["flops_per_image_stages"]["flow"]
                print(f"{r['model']} {r['mode']}: {r['steps']}-step student vs {t['steps']}-step cfg {t['cfg']:g} teacher: "
                      f"x{r['images_per_s'] / t['images_per_s']:.1f} images/s; the student's time: {shares}; "
                      f"FLOPs per image allow x{t['flops_per_image'] / r['flops_per_image']:.1f} "
                      f"(x{t['flops_per_image'] / rest:.1f} with a free flow)")
        compiled = {r["model"]: r["images_per_s"] for r in inf if r["mode"] == "compiled" and not r.get("student")}
        for r in inf:
            if r["mode"] == "package":
                vs = f", x{r['images_per_s'] / compiled[r['model']]:.2f} vs compiled" if r["model"] in compiled else ""
                export = f"export {r['export_s']:.1f} s (once)" if r["export_s"] is not None else f"package {r['package']}"
                print(f"{r['model']} package: {export}, load {r['load_s']:.1f} s{vs}")
    for r in records:
        if r["benchmark"] == "skipped":
            print(f"skipped {r['model']} {r['mode']}: {r['reason']}")
    for r in records:
        if r["benchmark"] == "train":
            peak = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a on CPU"
            print(f"train {r['model']}: batch {r['batch']}, ops {r['ops']}, recompute {r['recompute']}: "
                  f"{r['samples_per_s']:.3g} samples/s ({r['batch'] / r['seconds_max']:.3g}-{r['batch'] / r['seconds_min']:.3g}), "
                  f"MFU {100 * r['mfu']:.1f}%, peak {peak}")
    measured = [r for r in records if r["benchmark"] != "skipped"]
    if measured:
        r = measured[0]
        print(f"device: {r['device']}; torch {r['torch']}, triton {r['triton']}, commit {r['commit']}; "
              f"ceilings {r['ceiling_tflops']:.3g} TFLOP/s ({r['ceiling_matmul']} matmul, by library: "
              f"{', '.join(f'{k} {v:.3g}' for k, v in r['matmul_tflops_by_library'].items())}), "
              f"{r['ceiling_copy_gbps']:.0f} GB/s ({r['ceiling_copy']} copy), both measured; "
              "stage columns are shares of the median batch time")


def main(argv=None) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["XL", "H"] if on_gpu else ["tiny", "B"])
    p.add_argument("--batch", type=int, default=64 if on_gpu else 1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5 if on_gpu else 2)
    p.add_argument("--device", default=None)
    p.add_argument("--modes", "--mode", nargs="+", choices=list(MODES), default=None,
                   help="default: all but package (on CPU the CUDA-only ones are skipped with the reason)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="inference precision; auto: bf16 on CUDA, fp32 on every CPU")
    p.add_argument("--package", default=None,
                   help="mode package: time this exported package (built for --batch/--steps/--cfg) instead of exporting one")
    p.add_argument("--fused-kernels", action="store_true", help="also measure the Triton kernels (adds mode 'fused')")
    p.add_argument("--student-steps", type=int, default=None,
                   help="also measure the same model as an N-step distilled student (cfg 1: one row per image)")
    p.add_argument("--train-batch", type=int, default=64 if on_gpu else 2, help="per-device batch of the training step; 0: none")
    p.add_argument("--train-model", nargs="+", default=None,
                   help="models for the training step (default: --model on CUDA, tiny on CPU)")
    p.add_argument("--train-ops", choices=ops.IMPLS, default="reference")
    p.add_argument("--recompute", default="none", help="training recompute policy (see flowtok_fast/perf/planner.py)")
    p.add_argument("--train-only", action="store_true", help="only the training step")
    p.add_argument("--ceiling-size", type=int, default=None, help="matmul size of the measured ceiling (default 8192 GPU, 2048 CPU)")
    p.add_argument("--results", default="results/throughput.jsonl", help="JSON lines file to append to")
    args = p.parse_args(argv)

    dev = torch.device(args.device or ("cuda" if on_gpu else "cpu"))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    _RESULTS[:] = [args.results]
    load_warning(_LOAD)
    env = environment(dev)
    from flowtok_fast.deploy.dtype import resolve_dtype

    dtype, why = resolve_dtype(args.dtype, dev)
    print(why, file=sys.stderr, flush=True)
    print("measuring the matmul and copy ceilings ...", file=sys.stderr, flush=True)
    copy, matmul = measure_copy_ceiling(dev), {}

    def ceiling(ran: torch.dtype) -> dict:  # MFU divides by the matmul rate of the dtype that ran
        if ran not in matmul:
            matmul[ran] = measure_ceiling(dev, n=args.ceiling_size, dtype=ran)
        return {**matmul[ran], **copy}

    train_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # bench_train: bf16 autocast on CUDA
    records = []
    for model in [] if args.train_only else args.model:
        modes = args.modes or list(DEFAULT_MODES)
        if args.fused_kernels and "fused" not in modes:
            modes = modes + ["fused"]
        records += bench_inference(model, modes, args.batch, args.steps, args.cfg, args.resolution, args.repeats,
                                   args.device, ceiling(dtype), env, dtype, args.package, args.student_steps)
    if args.train_batch > 0:
        for model in args.train_model or (args.model if dev.type == "cuda" else ["tiny"]):
            records.append(bench_train(model, args.train_batch, args.repeats, args.device, args.train_ops,
                                       args.recompute, ceiling(train_dtype), env))
            save(records[-1])
    print_table(records)
    return records


if __name__ == "__main__":
    main()
