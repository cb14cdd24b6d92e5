"""`--dtype auto|fp32|bf16`: which precision to run in, one rule for the Python API, every verb and the
server. auto = bf16 autocast on CUDA, fp32 on every CPU: the same prompt and seed give the same
image on a CPU with native bf16 and on one without. bf16 on a CPU is opt-in (`--dtype bf16`): about
1.8x faster where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), emulated and slower elsewhere."""
from __future__ import annotations

import os

import torch

from flowtok_fast.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) at which its bf16 matmuls still use bf16 instructions
# (AVX512-BF16 or AMX); below them oneDNN emulates bf16 (measured: a bf16 linear 4x slower than fp32)
BF16_ISA_CAPS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                 "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: the CPU has AVX512-BF16 or AMX and oneDNN is not
    capped below them (ONEDNN_MAX_CPU_ISA=AVX2 makes this CPU behave as one without: that is how a
    CPU without native bf16 is rehearsed). torch.cpu._is_avx512_bf16_supported /
    _is_amx_tile_supported exist in torch 2.11 and 2.14; a torch without them is treated as 'no
    native bf16' (fp32 is never wrong, only slower)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if cap not in BF16_ISA_CAPS:
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def resolve_dtype(choice: str, device: torch.device | str) -> tuple[torch.dtype, str]:
    """(dtype, why) for `choice` on `device`; `why` is the line to print."""
    if choice not in CHOICES:
        raise UserError(f"--dtype: expected one of {CHOICES}, got {choice!r}")
    device = torch.device(device)
    if choice != "auto":
        return DTYPES[choice], f"dtype {choice} (as asked)"
    if device.type == "cuda":
        return torch.bfloat16, "dtype auto -> bf16 (CUDA)"
    if cpu_has_native_bf16():
        return torch.float32, ("dtype auto -> fp32 (CPU: the same images on every CPU; this one has native bf16, "
                               "--dtype bf16 runs faster)")
    return torch.float32, "dtype auto -> fp32 (CPU: the same images on every CPU; this one has no native bf16)"


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype `auto` picks on `device` (the pipelines' default)."""
    return resolve_dtype("auto", device)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES[dtype]
