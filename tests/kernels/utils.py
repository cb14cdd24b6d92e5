"""Shared helpers for the kernel tests: the error-budget rule and output poisoning."""
import contextlib
import os

import torch

from flowtok_fast.kernels import _common


def kernel_device() -> torch.device:
    """Where the kernels run in this session: CUDA when they are compiled (TRITON_INTERPRET=0)
    and a GPU is present, else the CPU, in Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_ref_error(out, ref_same, ref_exact, *, factor=2.0, atol=None, name="out"):
    """The kernel's error against a high-precision reference must stay within ``factor`` times
    the error of the same-precision PyTorch reference, plus a small atol (relative to the
    magnitude of the exact result)."""
    assert out.shape == ref_exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_exact.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten elements?)"
    scale = ref_exact.double().abs().max().item() + 1e-12
    if atol is None:
        # a low-precision output may round one ulp the other way where the exact value sits near a
        # rounding boundary: one bf16 ulp is up to 2^-7 of the magnitude (2e-3 failed ~1 run in
        # a few hundred: seed 514707947, gelu_tanh bf16 out, a 1-ulp flip at |out| ~ 6)
        atol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 1e-3}.get(out.dtype, 1e-5)
    err = max_err(out, ref_exact)
    ref_err = max_err(ref_same, ref_exact)
    budget = factor * ref_err + atol * scale
    assert err <= budget, (
        f"{name}: kernel error {err:.3e} exceeds {factor}x the {ref_same.dtype} reference error "
        f"{ref_err:.3e} + atol {atol * scale:.3e}"
    )


@contextlib.contextmanager
def poisoned_outputs():
    """Every output the kernels allocate starts as NaN for the duration."""
    old = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True
    try:
        yield
    finally:
        _common.POISON_OUTPUTS = old


def saved_bytes(fn) -> int:
    """Unique storage bytes autograd keeps for backward while running fn."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
