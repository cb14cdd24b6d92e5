"""Helpers shared by the kernel files: device and dtype checks, output allocation, launch sizes,
and the bf16 rounding helper."""
import os

import torch
import triton
import triton.language as tl

# Tests set this to True so that every output a kernel allocates starts as NaN: an element the
# kernel forgets to write then shows up as a NaN instead of stale memory that happens to match.
POISON_OUTPUTS = False

# Storage dtypes the elementwise kernels take (math runs in fp32 whatever they are).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: expected {name} of dtype float32/bfloat16/float16, got {t.dtype}")


def check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: expected out_dtype float32/bfloat16/float16 or None, got {out_dtype}")


def new_empty(shape, *, like: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


# Triton's CPU interpreter converts fp32 -> bf16 by truncation, GPUs round to nearest even. The
# kernels cast their outputs through round_to so that interpreter runs (our tests) give the
# GPU's bits. Fixed at import, like @triton.jit itself; on a GPU the branch is not even emitted.
_EMULATE_BF16_RNE = tl.constexpr(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even also in the interpreter."""
    if _EMULATE_BF16_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)
