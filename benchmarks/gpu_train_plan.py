"""The planner's answer for the GPU suite's training step, computed HERE (CPU) and carried as JSON.

    python benchmarks/gpu_train_plan.py                    # XL, H and tiny at 139 GiB -> benchmarks/gpu_plan.json

For each model: the plan of a global batch of 8192 on 8 GPUs of --gpu-mem GiB (its choice of ops
and recompute policy), then the one-GPU training step the suite measures with that choice: the
largest batch up to the plan's per-GPU batch that the planner predicts to fit on one GPU (whole
fp32 state, no EMA, as benchmarks/throughput.py trains, 2 GiB left for transients), rounded
down to a multiple of 8, and the planner's predicted peak at that batch (no reserve: the suite
compares it with torch.cuda.max_memory_allocated). The activations are measured on fake
tensors (CPU dispatch), so the answer does not need the GPU; the torch version is recorded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "benchmarks" / "gpu_plan.json"


def train_choice(model: str, gpu_mem_gib: float, global_batch: int = 8192, gpus: int = 8,
                 impls=("reference", "triton")) -> dict:
    from flowtok_fast.perf import planner

    p = planner.plan(model, global_batch, gpus, gpu_mem_gib, impls=impls, progress=True)
    choice = p["choice"] or {"ops": "reference", "policy": "full", "sharding": "fsdp2"}
    cfg = planner.get_config(model)
    params, block_params = planner._param_counts(cfg)
    acts = planner.activation_model(cfg, choice["ops"], choice["policy"])
    base = planner.activation_model(cfg, choice["ops"], "none")
    working = 0.0 if choice["policy"] == "none" else base["per_sample_per_block"]

    def predicted(batch: int) -> float:
        return planner.memory_per_gpu(params=params, block_params=block_params, batch=batch,
                                      act_per_sample=acts["per_sample"], act_const=acts["const"],
                                      working_per_sample=working, sharding="ddp", gpus=1, reserve_bytes=0,
                                      ema=False)["total"]

    fits = planner.max_batch((gpu_mem_gib - 2) * planner.GIB, predicted(0), acts["per_sample"] + working)
    batch = max(8, min(p["per_gpu_batch"], fits) // 8 * 8)
    import torch

    return {"model": cfg.name, "gpu_mem_gib": gpu_mem_gib, "plan_global_batch": global_batch, "plan_gpus": gpus,
            "plan_per_gpu_batch": p["per_gpu_batch"], "plan_sharding": choice["sharding"], "ops": choice["ops"],
            "policy": choice["policy"], "plan_fits": p["choice"] is not None, "one_gpu_max_batch": fits,
            "batch": batch, "predicted_peak_gib": predicted(batch) / planner.GIB,
            "per_sample_mib": (acts["per_sample"] + working) / 2**20, "fixed_gib": predicted(0) / planner.GIB,
            "planner_torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["XL", "H", "tiny"])
    ap.add_argument("--gpu-mem", type=float, default=139.0, help="GiB of the GPU the suite will run on (H200: 139)")
    ap.add_argument("--out", default=str(DEFAULT))
    args = ap.parse_args(argv)
    entries = {m: train_choice(m, args.gpu_mem) for m in args.models}
    for e in entries.values():
        print(f"{e['model']}: ops {e['ops']}, recompute {e['policy']}, one-GPU batch {e['batch']}, "
              f"predicted peak {e['predicted_peak_gib']:.1f} GiB", flush=True)
    from flowtok_fast.perf.planner import write_json_atomic

    write_json_atomic(args.out, entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
