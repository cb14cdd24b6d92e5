"""Which shapes the kernel correctness tests run. By default (CI) small, awkward shapes that
Triton's interpreter runs in seconds. With FLOWTOK_KERNEL_SHAPES=real (the GPU suite, with
TRITON_INTERPRET=0 on CUDA) also the real model shapes: 77 and 410 tokens, head dims 64 and 72
at 16 / 20 heads, widths D 1152 / 1280, SwiGLU h 2730 / 2048, in bf16 and fp32, and every
output a kernel allocates starts as NaN (tests/kernels/conftest.py)."""
import os

_MODE = os.environ.get("FLOWTOK_KERNEL_SHAPES", "ci")
if _MODE not in ("ci", "real"):
    raise ValueError(f"FLOWTOK_KERNEL_SHAPES: expected 'ci' or 'real', got {_MODE!r}")
REAL = _MODE == "real"


def real(cases: list) -> list:
    """``cases`` in the real-shape mode, else nothing."""
    return list(cases) if REAL else []
