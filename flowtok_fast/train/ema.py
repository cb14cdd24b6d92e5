"""Exponential moving average of the trainable parameters, kept in fp32.

Under FSDP the parameters are sharded DTensors and so are their averages: each rank keeps the
EMA of its own shard, and distributed checkpointing saves the shards.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self._params]

    @torch.no_grad()
    def update(self) -> None:
        # shadow += (1 - decay) * (param - shadow), in fp32, one fused call over all tensors
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self._params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:5]}")
        with torch.no_grad():
            for name, t in zip(self.names, self.shadow):
                t.copy_(state[name])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averages into an unsharded module with the same parameter names (e.g. for
        export); under FSDP gather first (`full_state_dict`)."""
        params = dict(module.named_parameters())
        for name, t in self.state_dict().items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            params[name].copy_(full.reshape(params[name].shape))
