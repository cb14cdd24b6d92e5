"""Fixed sin-cos embeddings of the generator: token positions and flow time."""
import math

import torch


def sincos_1d(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim], sin first: concat(sin(pos * w), cos(pos * w)), w_i = 10000^(-i/(dim/2)).

    Computed in float64 as the reference does, returned in fp32.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    w = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = torch.arange(num_positions, dtype=torch.float64)[:, None] * w[None]
    return torch.cat([args.sin(), args.cos()], dim=1).float()


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B, dim], cos first: concat(cos(t * f), sin(t * f)), f_i = exp(-ln(max_period) * i / (dim/2)).

    t is the raw flow time in [0, 1] (not scaled by 1000).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
