"""2-D rotary position tables (EVA-02 style) for the image tokenizer's patch tokens."""
import torch


def rope_2d_tables(grid: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [grid*grid, head_dim] for tokens p = row * grid + col.

    The first half of each head's channels rotates by the row index, the second half by the
    column index. Within a half of `d = head_dim // 2` channels there are d/2 frequencies
    theta^(-2j/d), each repeated twice so adjacent channel pairs (2k, 2k+1) share an angle.
    Integer positions: a 512 px grid is not interpolated from 256.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # [half/2]
    freqs = freqs.repeat_interleave(2)  # [half]: f0 f0 f1 f1 ...
    pos = torch.arange(grid, dtype=torch.float64)
    rows = pos[:, None, None] * freqs  # [g, 1, half]
    cols = pos[None, :, None] * freqs  # [1, g, half]
    angles = torch.cat([rows.expand(grid, grid, half), cols.expand(grid, grid, half)], dim=-1)
    angles = angles.reshape(grid * grid, head_dim)
    return angles.cos().float(), angles.sin().float()
