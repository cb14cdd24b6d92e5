"""Run by test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

argv: OUT_DIR BASE_CONFIG_JSON. Trains the same tiny run with DDP (1 micro-batch per process)
and with FSDP2 (2 micro-batches per process, activation checkpointing), then resumes the FSDP run
from its step-2 checkpoint; rank 0 saves each run's losses, full weights and EMA to
OUT_DIR/<tag>.pt for the test to compare with one process.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from flowtok_fast.train import TrainConfig, Trainer
from flowtok_fast.train.trainer import setup_distributed


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(out, base, tag, **kw):
    trainer = Trainer(TrainConfig(**{**base, "output_dir": f"{out}/{tag}", **kw}), device=device)
    history = trainer.train()
    model = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema = {k: full(v).detach().cpu() for k, v in trainer.ema.state_dict().items()}
    leaf_types = {type(p).__name__ for p in trainer.objective.parameters()}
    if dist.get_rank() == 0:
        torch.save({"losses": [h["loss"] for h in history], "model": model, "ema": ema, "types": sorted(leaf_types)}, f"{out}/{tag}.pt")
    dist.barrier()


if __name__ == "__main__":
    out, base = sys.argv[1], json.loads(sys.argv[2])
    device = setup_distributed()
    run(out, base, "ddp", parallelism="ddp")
    # FSDP with 2 micro-batches per process (the no-sync path of accumulation) and activation
    # checkpointing; then resumed from its step-2 checkpoint
    fsdp = dict(parallelism="fsdp", micro_batch=base["global_batch"] // 4, activation_checkpointing=True)
    run(out, base, "fsdp", ckpt_interval=2, keep_checkpoints=5, **fsdp)
    run(out, base, "fsdp_resumed", output_dir=f"{out}/fsdp", resume=f"{out}/fsdp/checkpoints/step_00000002", **fsdp)
    dist.destroy_process_group()
