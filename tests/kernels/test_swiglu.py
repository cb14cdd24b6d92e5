"""SwiGLU and tanh-GELU (kernels/swiglu.py) against their PyTorch references.

Error rule: the kernel's error against an fp64 reference stays within 2x the error of the
same-precision PyTorch reference plus a small atol, for the output and every gradient. Inputs
are fresh each run (the seed is printed, so pytest shows it on failure); kernel outputs are
NaN-poisoned so an unwritten element fails.
"""

import pytest
import torch

from flowtok_fast.kernels import swiglu as sw
from .shapes import real
from .utils import assert_within_ref_error, poisoned_outputs

F32, BF16 = torch.float32, torch.bfloat16


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run(fn, leaves, out_grad):
    out = fn(*leaves)
    used = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out.double() * out_grad.double()).sum(), used)


def _check_all(fn_kernel, fn_ref, inputs, leaf_names):
    """Kernel vs same-precision and fp64 references: output and the grads of every input."""
    out_grad = torch.randn(fn_ref(*inputs).shape).to(fn_ref(*inputs).dtype)
    with poisoned_outputs():
        out_k, grads_k = _run(fn_kernel, _leaves(inputs), out_grad)
    out_s, grads_s = _run(fn_ref, _leaves(inputs), out_grad)
    out_e, grads_e = _run(fn_ref, _leaves(inputs, torch.float64), out_grad)
    assert out_k.dtype == out_s.dtype, f"out: dtype {out_k.dtype}, reference gives {out_s.dtype}"
    assert_within_ref_error(out_k, out_s, out_e, name="out")
    for name, k, s, e in zip(leaf_names, grads_k, grads_s, grads_e):
        assert k.dtype == s.dtype, f"grad {name}: dtype {k.dtype}, reference gives {s.dtype}"
        assert_within_ref_error(k, s, e, name=f"grad {name}")


# Decoder (h 2730, 410 tokens at 256 px), encoder (h 2048), and a tiny odd h; the big shapes
# once per dtype to keep the interpreter run short.
SWIGLU_CASES = [(BF16, (1, 410, 2730)), (F32, (1, 77, 2730)), (F32, (3, 77, 2048)),
                (F32, (3, 5, 37)), (BF16, (3, 5, 37))] + real(
    [(dt, shape) for dt in (BF16, F32) for shape in ((16, 410, 2730), (16, 410, 2048))])


@pytest.mark.parametrize("dtype,shape", [
    pytest.param(d, s, id=f"{str(d)[6:]}-{'x'.join(map(str, s))}") for d, s in SWIGLU_CASES])
def test_swiglu(dtype, shape):
    B, N, h = shape
    x12 = (2.0 * torch.randn(B, N, 2 * h)).to(dtype)  # wide enough to reach silu's tails
    _check_all(sw.swiglu, sw.swiglu_ref, (x12,), ("x12",))


def test_swiglu_2d_and_noncontiguous():
    # A [M, 2h] input, and a non-contiguous view (every other row).
    x12 = torch.randn(14, 2 * 37)
    with poisoned_outputs():
        out = sw.swiglu(x12[::2])
    exact = sw.swiglu_ref(x12[::2].double())
    assert_within_ref_error(out, sw.swiglu_ref(x12[::2]), exact)


# (x dtype, bias dtype or None, out_dtype argument)
GELU_CASES = [
    (F32, F32, None),
    (F32, None, None),
    (BF16, BF16, None),
    (BF16, None, None),
    (BF16, F32, BF16),  # autocast: bf16 fc1 output without bias, fp32 bias fused, bf16 out
    (BF16, F32, None),  # same inputs, promoted (fp32) output as eager gives
]


def _gelu_id(case):
    x, b, o = case
    return f"x{str(x)[6:]}-b{str(b)[6:] if b else 'none'}-out{str(o)[6:] if o else 'default'}"


# Every case at a small odd width (800 = 512 + a partial block); the generator-XL width
# (4 * 1152) for the autocast case only.
@pytest.mark.parametrize("case,shape", [pytest.param(c, (3, 77, 800), id=_gelu_id(c) + "-3x77x800")
                                        for c in GELU_CASES]
                         + [pytest.param(c, (1, 77, 4608), id=_gelu_id(c) + "-1x77x4608")
                            for c in GELU_CASES[4:5]]
                         + real([pytest.param(c, (64, 77, f), id=_gelu_id(c) + f"-64x77x{f}")
                                 for c in GELU_CASES for f in (4608, 5120)]))
def test_gelu_tanh(case, shape):
    x_dtype, b_dtype, out_dtype = case
    x = (3.0 * torch.randn(shape)).to(x_dtype)  # covers both tails of the tanh
    bias = None if b_dtype is None else torch.randn(shape[-1]).to(b_dtype)

    def fn(op):
        return lambda x, bias: op(x, bias, out_dtype=out_dtype)

    names = ("x",) if bias is None else ("x", "bias")
    _check_all(fn(sw.gelu_tanh), fn(sw.gelu_tanh_ref), (x, bias), names)


def test_gelu_tanh_pointwise_and_extreme_inputs():
    # Tails (finite, exact limits) and the curved middle at fp32 precision: a slightly wrong
    # constant in the tanh argument shows here even where the error-budget rule's atol hides it.
    x = torch.tensor([-1e4, -60.0, -12.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 12.0, 60.0, 1e4])
    x = x.repeat(2, 1).requires_grad_(True)
    with poisoned_outputs():
        out = sw.gelu_tanh(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    ref = sw.gelu_tanh_ref(x64)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_matches_eager():
    def f(x12, w, bias):
        h = sw.swiglu(x12)  # [..., 16]
        return sw.gelu_tanh(h @ w, bias).pow(2).sum() + sw.gelu_tanh(h).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = (torch.randn(2, 5, 32), torch.randn(16, 24), torch.randn(24))
    eager_leaves, comp_leaves = _leaves(inputs), _leaves(inputs)
    eager_loss, comp_loss = f(*eager_leaves), compiled(*comp_leaves)
    torch.testing.assert_close(comp_loss, eager_loss)
    for name, a, b in zip(("x12", "w", "bias"), torch.autograd.grad(comp_loss, comp_leaves),
                          torch.autograd.grad(eager_loss, eager_leaves)):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad {name}: {m}")


def _saved_storages(fn, *args):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    return [t.untyped_storage().data_ptr() for t in saved]


def test_backward_saves_only_the_inputs():
    x12 = torch.randn(2, 3, 10, requires_grad=True)
    assert _saved_storages(sw.swiglu, x12) == [x12.untyped_storage().data_ptr()]
    x, bias = torch.randn(2, 3, 10, requires_grad=True), torch.randn(10, requires_grad=True)
    inputs = {x.untyped_storage().data_ptr(), bias.untyped_storage().data_ptr()}
    saved = _saved_storages(sw.gelu_tanh, x, bias)
    assert set(saved) == inputs and len(saved) == 2, "gelu_tanh must save exactly x and bias"
    # The eager GELU saves its (biased) input, not x: the fused bias saves a full tensor.
    assert not set(_saved_storages(sw.gelu_tanh_ref, x, bias)) <= inputs


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x12 of shape \[\.\.\., 2h\] \(even last dim, h >= 1\), "
                                         r"got \[2, 7\]"):
        sw.swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"x12 of dtype .*got torch.int64"):
        sw.swiglu(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x of shape \[\.\.\., F\] with F >= 1, got \[2, 0\]"):
        sw.gelu_tanh(torch.randn(2, 0))
    with pytest.raises(ValueError, match=r"bias of shape \[8\], got \[7\]"):
        sw.gelu_tanh(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match=r"bias of dtype .*got torch.int32"):
        sw.gelu_tanh(torch.randn(2, 8), torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out_dtype .*got torch.int8"):
        sw.gelu_tanh(torch.randn(2, 8), out_dtype=torch.int8)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    # Explicitly on the CPU: on a GPU machine the kernel tests' default device is CUDA.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(got cpu\)"):
        sw.swiglu(torch.randn(2, 8, device="cpu"))
