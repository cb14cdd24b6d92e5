"""The one place where the training model is wrapped: fused kernels, activation checkpointing,
per-block compile, then DDP or FSDP2. Models stay plain modules that read like the paper.

Order matters (as in torchtitan): activation checkpointing and compile act on each DiT block,
then FSDP shards each block (so one block's parameters are gathered at a time) and the root.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from flowtok_fast import ops
from flowtok_fast.errors import UserError
from flowtok_fast.perf.planner import apply_recompute


def _temperature_1d(generator: nn.Module) -> None:
    # FSDP2 cannot shard 0-d parameters; the scalar temperature becomes shape [1] for training in
    # every mode, so training checkpoints are the same whatever the parallelism (EMA.copy_to and
    # exports reshape it back to the published [] shape).
    t = generator.t2t_temperature
    if t.dim() == 0:
        generator.t2t_temperature = nn.Parameter(t.detach().reshape(1), requires_grad=t.requires_grad)


def parallelize(
    objective: nn.Module,
    parallelism: str = "none",
    device: torch.device | str = "cpu",
    fused_kernels: bool = False,
    activation_checkpointing: bool | str = False,
    compile_blocks: bool = False,
) -> nn.Module:
    """Apply the systems options to `objective` (a FlowTokObjective) and return the module to call.

    `activation_checkpointing`: False/"none", True/"full" (recompute every block), or one of the
    planner's selective policies ("pointwise", "attn", "qkv", "attn+qkv"; see perf/planner.py).
    The returned module is `objective` itself for "none" and "fsdp" (fully_shard works in place)
    and a DistributedDataParallel wrapper for "ddp". Parameters must already be on `device`.
    """
    generator = objective.generator
    _temperature_1d(generator)
    ops.use(generator, "triton" if fused_kernels else "reference")
    policy = {True: "full", False: "none"}.get(activation_checkpointing, activation_checkpointing)
    apply_recompute(generator, policy)  # overrides forward on the instances: parameter names stay
    for block in generator.blocks:
        if compile_blocks:
            block.compile()
    if parallelism == "none":
        return objective
    if not dist.is_initialized():
        raise UserError(f"parallelism={parallelism} needs torch.distributed: launch with torchrun")
    device = torch.device(device)
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # fp32 parameters and gradient reduction; compute precision comes from autocast
        for block in generator.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(objective, mesh=mesh)  # the rest: embedders, final layer, text VAE, projector
        return objective
    raise ValueError(f"unknown parallelism '{parallelism}': expected none, ddp or fsdp")


def grad_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce / reduce-scatter on
    all but the last micro-batch of an accumulation."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()
