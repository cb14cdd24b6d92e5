"""Untrained weights whose flow moves. DiT zero-initialises its adaLN modulation and output layers
(a training recipe: every block starts as the identity), so a freshly built generator predicts
velocity 0 everywhere and sampling returns its starting point unchanged: `--random-weights` drew
a black square, and a test on such a model would not exercise the flow at all."""
from __future__ import annotations

import torch


def make_flow_move(generator: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Draws every all-zero weight of `generator` (of more than one element) from N(0, scale^2),
    from `seed`, in place; returns it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in generator.parameters():
            if p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return generator
