"""End-to-end text-to-image throughput with a per-stage split (CLIP, text VAE, flow loop, decoder).

    python benchmarks/throughput.py                       # CPU default: tiny + B, batch 2, 20 steps
    python benchmarks/throughput.py --model XL --batch 64 # on a GPU

Random weights (speed does not depend on them). Each stage is timed separately after a warm-up;
the median over repeats is reported, with the spread. One JSON record per configuration is
appended to --results.
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

from flowtok_fast.configs import get_config  # noqa: E402
from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions  # noqa: E402

STAGES = ("clip", "text_vae", "flow", "decoder")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stages(pipe: FlowTokPipeline, prompts: list[str], opts: SamplingOptions) -> dict[str, float]:
    """Seconds per stage for one batch."""
    out, dev = {}, pipe.device

    def timed(name, fn):
        _sync(dev)
        t0 = time.perf_counter()
        result = fn()
        _sync(dev)
        out[name] = time.perf_counter() - t0
        return result

    feats = timed("clip", lambda: pipe.encode_text(prompts))
    z = timed("text_vae", lambda: pipe.text_latents(feats, pipe.generator_rng(opts.seed)))
    x = timed("flow", lambda: pipe.flow(z, opts))
    timed("decoder", lambda: pipe.decode(x, feats))
    return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(model: str, batch: int, steps: int, cfg: float, resolution: int, repeats: int, device: str | None,
        fused: bool) -> dict:
    config = get_config(model, resolution)
    pipe = FlowTokPipeline.random(config, device=device, fused_kernels=fused)
    opts = SamplingOptions(steps=steps, cfg_scale=cfg)
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    # warm-up: every code path once (allocator, kernels, autotuning); 2 steps are as good as 20
    time_stages(pipe, prompts, SamplingOptions(steps=min(2, steps), cfg_scale=cfg))
    runs = [time_stages(pipe, prompts, opts) for _ in range(repeats)]
    totals = [sum(r.values()) for r in runs]
    med = statistics.median(totals)
    import triton

    return {
        "benchmark": "throughput",
        "model": config.name, "resolution": config.tokenizer.resolution, "batch": batch, "steps": steps,
        "cfg": cfg, "dtype": str(pipe.dtype).removeprefix("torch."), "ops": "triton" if fused else "reference",
        "device": device_name(pipe.device), "torch": torch.__version__, "triton": triton.__version__,
        "commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "images_per_s": batch / med,
        "seconds_median": med, "seconds_min": min(totals), "seconds_max": max(totals), "repeats": repeats,
        "stages_s": {s: statistics.median(r[s] for r in runs) for s in STAGES},
    }


def print_table(records: list[dict]) -> None:
    head = f"{'model':>6} {'res':>4} {'batch':>5} {'steps':>5} {'ops':>9} {'img/s':>8} {'spread':>14} " + " ".join(f"{s:>9}" for s in STAGES)
    print(head)
    for r in records:
        spread = f"{r['batch'] / r['seconds_max']:.3g}-{r['batch'] / r['seconds_min']:.3g}"
        split = " ".join(f"{100 * r['stages_s'][s] / r['seconds_median']:8.1f}%" for s in STAGES)
        print(f"{r['model']:>6} {r['resolution']:>4} {r['batch']:>5} {r['steps']:>5} {r['ops']:>9} "
              f"{r['images_per_s']:8.3g} {spread:>14} {split}")
    print(f"device: {records[0]['device']}; torch {records[0]['torch']}, triton {records[0]['triton']}, "
          f"commit {records[0]['commit']}; stage columns are shares of the median batch time")


def main(argv=None) -> None:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["XL", "H"] if on_gpu else ["tiny", "B"])
    p.add_argument("--batch", type=int, default=64 if on_gpu else 2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5 if on_gpu else 2)
    p.add_argument("--device", default=None)
    p.add_argument("--fused-kernels", action="store_true", help="also measure the Triton kernels (CUDA)")
    p.add_argument("--results", default="results/throughput.jsonl", help="JSON lines file to append to")
    args = p.parse_args(argv)

    records = []
    for model in args.model:
        for fused in ([False, True] if args.fused_kernels else [False]):
            print(f"measuring {model} (ops={'triton' if fused else 'reference'}) ...", file=sys.stderr, flush=True)
            records.append(run(model, args.batch, args.steps, args.cfg, args.resolution, args.repeats, args.device, fused))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print_table(records)


if __name__ == "__main__":
    main()
