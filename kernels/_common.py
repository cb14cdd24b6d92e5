"""Helpers shared by the kernel files: device checks, output allocation, launch sizes."""
import os

import torch
import triton

# Tests set this to True so that every output a kernel allocates starts as NaN: an element the
# kernel forgets to write then shows up as a NaN instead of stale memory that happens to match.
POISON_OUTPUTS = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor, op: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise RuntimeError(
            f"flowtok kernel '{op}' needs CUDA tensors (got {t.device}); on CPU set "
            "TRITON_INTERPRET=1 before importing flowtok_fast, or use the 'reference' ops"
        )


def new_empty(shape, *, like: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))
