"""adaLN chain (kernels/adaln.py) against its PyTorch reference.

Error rule: the kernel's error against an fp64 reference stays within 2x the error of the
same-precision PyTorch reference plus a small atol, for the outputs and every gradient. Inputs
are fresh each run (the seed is printed, so pytest shows it on failure); kernel outputs are
NaN-poisoned so an unwritten element fails. Modulation vectors are chunks of one [B, 6D] tensor,
as in the model, so they are strided views.
"""

import pytest
import torch

from flowtok_fast.kernels import adaln
from .shapes import REAL, real
from .utils import assert_within_ref_error, poisoned_outputs

F32, BF16 = torch.float32, torch.bfloat16
# (name, residual dtype, dtype of y and the modulation vectors, out_dtype argument)
REGIMES = [
    ("fp32", F32, F32, None),
    ("bf16", BF16, BF16, None),
    ("mixed", F32, BF16, BF16),  # autocast: fp32 residual, bf16 branch output, bf16 modulated out
    ("mixed_default", F32, BF16, None),  # same inputs, promoted (fp32) output
]
SHAPES = [(1, 77, 1152), (3, 77, 200), (1, 410, 75)]
# FLOWTOK_KERNEL_SHAPES=real: the XL and H widths at a sampling-size batch, every regime.
REAL_SHAPES = real([(64, 77, 1152), (64, 77, 1280)])
CHUNKS = ("shift", "scale", "gate")  # slot order inside the [B, 3D] modulation tensor


def _inputs(B, N, D, x_dtype, mod_dtype):
    x = torch.randn(B, N, D).to(x_dtype)
    y = torch.randn(B, N, D).to(mod_dtype)
    ada = (0.5 * torch.randn(B, 3 * D)).to(mod_dtype)
    return x, y, ada


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run(fn, leaves, out_grads):
    """Outputs of fn(*leaves) and the gradients of sum(out * grad) w.r.t. every leaf."""
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, out_grads))
    return outs, torch.autograd.grad(loss, leaves)


def _check_all(fn_kernel, fn_ref, inputs, out_names, leaf_names, D):
    """Runs kernel, same-precision reference and fp64 reference; checks outputs and grads."""
    outs_s = fn_ref(*inputs)
    outs_s = outs_s if isinstance(outs_s, tuple) else (outs_s,)
    out_grads = [torch.randn(o.shape).to(o.dtype) for o in outs_s]
    with poisoned_outputs():
        outs_k, grads_k = _run(fn_kernel, _leaves(inputs), out_grads)
    outs_s, grads_s = _run(fn_ref, _leaves(inputs), out_grads)
    outs_e, grads_e = _run(fn_ref, _leaves(inputs, torch.float64), out_grads)
    for name, k, s, e in zip(out_names, outs_k, outs_s, outs_e):
        assert k.dtype == s.dtype, f"{name}: dtype {k.dtype}, reference gives {s.dtype}"
        assert_within_ref_error(k, s, e, name=name)
    for name, k, s, e in zip(leaf_names, grads_k, grads_s, grads_e):
        assert k.dtype == s.dtype, f"grad {name}: dtype {k.dtype}, reference gives {s.dtype}"
        if name == "ada":  # one check per modulation vector
            for i, chunk in enumerate(CHUNKS):
                sl = slice(i * D, (i + 1) * D)
                assert_within_ref_error(k[:, sl], s[:, sl], e[:, sl], name=f"grad {chunk}")
        else:
            assert_within_ref_error(k, s, e, name=f"grad {name}")


def _split(ada):
    shift, scale, gate = ada.chunk(3, dim=1)
    return shift, scale, gate


def _cases(regimes, shapes):
    """Every regime at every shape, except that the long N = 410 shape (slow in the
    interpreter) runs only in the fp32 and mixed regimes."""
    return [pytest.param(r, s, id=f"{r[0]}-{'x'.join(map(str, s))}")
            for r in regimes for s in shapes + REAL_SHAPES if s[1] < 400 or r[0] in ("fp32", "mixed") or REAL]


@pytest.mark.parametrize("regime,shape", _cases(REGIMES, SHAPES))
def test_gated_residual_ln_modulate(regime, shape):
    _, x_dtype, mod_dtype, out_dtype = regime
    B, N, D = shape

    def fused(op):
        def fn(x, y, ada):
            shift, scale, gate = _split(ada)
            return op(x, y, gate, shift, scale, out_dtype=out_dtype)
        return fn

    _check_all(fused(adaln.gated_residual_ln_modulate), fused(adaln.gated_residual_ln_modulate_ref),
               _inputs(B, N, D, x_dtype, mod_dtype), ("res", "mod"), ("x", "y", "ada"), D)


@pytest.mark.parametrize("regime,shape", _cases(REGIMES, SHAPES[:2]))
def test_ln_modulate(regime, shape):
    _, x_dtype, mod_dtype, out_dtype = regime
    B, N, D = shape

    def mod(op):
        def fn(x, ada):
            shift, scale, _ = _split(ada)
            return op(x, shift, scale, out_dtype=out_dtype)
        return fn

    x, _, ada = _inputs(B, N, D, x_dtype, mod_dtype)
    x = x * 3.0 + 2.0  # a non-zero mean and non-unit spread for the statistics
    _check_all(mod(adaln.ln_modulate), mod(adaln.ln_modulate_ref), (x, ada), ("mod",), ("x", "ada"), D)


@pytest.mark.parametrize("regime,shape", _cases(REGIMES[:3], SHAPES[1:]))
def test_gated_residual(regime, shape):
    _, x_dtype, mod_dtype, _ = regime
    B, N, D = shape

    def res(op):
        def fn(x, y, ada):
            return op(x, y, _split(ada)[2])
        return fn

    _check_all(res(adaln.gated_residual), res(adaln.gated_residual_ref),
               _inputs(B, N, D, x_dtype, mod_dtype), ("res",), ("x", "y", "ada"), D)


@pytest.mark.parametrize("regime", REGIMES[1:3], ids=lambda r: r[0])
def test_fused_equals_unfused_kernels(regime):
    # The fused op normalises the residual as stored (rounded to its dtype), so it must give the
    # same bits as gated_residual followed by ln_modulate.
    _, x_dtype, mod_dtype, out_dtype = regime
    x, y, ada = _inputs(2, 77, 200, x_dtype, mod_dtype)
    shift, scale, gate = _split(ada)
    with poisoned_outputs():
        res, mod = adaln.gated_residual_ln_modulate(x, y, gate, shift, scale, out_dtype=out_dtype)
        res2 = adaln.gated_residual(x, y, gate)
        mod2 = adaln.ln_modulate(res2, shift, scale, out_dtype=out_dtype)
    assert torch.equal(res, res2)
    assert torch.equal(mod, mod2)


def test_contiguous_vectors_and_large_offset():
    # Contiguous [B, D] vectors (stride D) and a large common offset in x, where a one-pass
    # E[x^2] - E[x]^2 variance would lose every significant bit in fp32.
    B, N, D = 2, 9, 200
    x = torch.randn(B, N, D) + 1000.0
    shift, scale = torch.randn(B, D), torch.randn(B, D)
    with poisoned_outputs():
        out = adaln.ln_modulate(x, shift, scale)
    exact = adaln.ln_modulate_ref(x.double(), shift.double(), scale.double())
    assert_within_ref_error(out, adaln.ln_modulate_ref(x, shift, scale), exact)


# Determinism of the backward: tests/kernels/test_determinism.py


def test_torch_compile_fullgraph_matches_eager():
    B, N, D = 2, 7, 40

    def f(x, y, ada):
        shift, scale, gate = _split(ada)
        h = adaln.ln_modulate(x, shift, scale)
        r = adaln.gated_residual(x, h, gate)
        res, mod = adaln.gated_residual_ln_modulate(r, y, gate, shift, scale, out_dtype=torch.bfloat16)
        return (res * mod.float()).sum() + mod.float().pow(2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, y, ada = _inputs(B, N, D, F32, F32)
    eager_leaves, comp_leaves = _leaves((x, y, ada)), _leaves((x, y, ada))
    eager_loss, comp_loss = f(*eager_leaves), compiled(*comp_leaves)
    torch.testing.assert_close(comp_loss, eager_loss)
    eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
    comp_grads = torch.autograd.grad(comp_loss, comp_leaves)
    for name, a, b in zip(("x", "y", "ada"), comp_grads, eager_grads):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad {name}: {m}")


def _saved(fn, *args):
    """fn(*args) and the list of tensors it saved for backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def _nbytes(tensors):
    # Distinct storages only: a tensor saved twice costs its memory once.
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("op", ["gated_residual_ln_modulate", "ln_modulate"])
def test_saves_fewer_bytes_and_no_normalized_tensor(op):
    # Autocast-like dtypes at the XL width: fp32 residual, bf16 branch output and vectors.
    B, N, D = 1, 77, 1152
    x, y, ada = _inputs(B, N, D, F32, BF16)
    shape = (B, N, D)

    def call(impl, x, y, ada):
        shift, scale, gate = _split(ada)
        if op == "ln_modulate":
            return (getattr(adaln, op + impl)(x, shift, scale),)
        return getattr(adaln, op + impl)(x, y, gate, shift, scale)

    results = {}
    for impl in ("", "_ref"):
        leaves = _leaves((x, y, ada))
        outs, saved = _saved(call, impl, *leaves)
        # Full-size tensors may be saved only if they are inputs or the residual output.
        allowed = [leaves[0], leaves[1]] + ([outs[0]] if op == "gated_residual_ln_modulate" else [])
        allowed = {t.untyped_storage().data_ptr() for t in allowed}
        extra = [t for t in saved
                 if tuple(t.shape) == shape and t.untyped_storage().data_ptr() not in allowed]
        results[impl] = (_nbytes(saved), extra)
    kernel_bytes, ref_bytes = results[""][0], results["_ref"][0]
    print(f"{op}: saved {kernel_bytes} B vs reference {ref_bytes} B (ratio {kernel_bytes / ref_bytes:.3f})")
    extra = results[""][1]
    assert not extra, f"kernel saved {len(extra)} tensor(s) of the normalised shape besides inputs/residual"
    # The check has teeth: the reference composition does save the normalised tensor.
    assert results["_ref"][1], "reference composition saved no normalised tensor (test is broken)"
    assert kernel_bytes < ref_bytes, f"kernel saves {kernel_bytes} B, reference {ref_bytes} B"


def test_bad_inputs():
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    v = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"x of shape \[B, N, D\], got \(10, 8\)"):
        adaln.ln_modulate(x.view(10, 8), v, v)
    with pytest.raises(ValueError, match=r"shift of shape \[2, 8\], got \[2, 1, 8\]"):
        adaln.ln_modulate(x, v[:, None], v)
    with pytest.raises(ValueError, match=r"scale of shape \[2, 8\], got \[1, 8\]"):
        adaln.gated_residual_ln_modulate(x, y, v, v, v[:1])
    with pytest.raises(ValueError, match=r"y of shape \[2, 5, 8\], got \[2, 4, 8\]"):
        adaln.gated_residual(x, y[:, :4], v)
    with pytest.raises(ValueError, match=r"gate of dtype .*got torch.int64"):
        adaln.gated_residual(x, y, v.long())
    with pytest.raises(ValueError, match=r"out_dtype .*got torch.int32"):
        adaln.ln_modulate(x, v, v, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"1 <= D <= 4096 .*got D=5000"):
        adaln.ln_modulate(torch.randn(1, 1, 5000), torch.randn(1, 5000), torch.randn(1, 5000))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    # Explicitly on the CPU: on a GPU machine the kernel tests' default device is CUDA.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    v = torch.randn(1, 8, device="cpu")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(got cpu\)"):
        adaln.ln_modulate(torch.randn(1, 3, 8, device="cpu"), v, v)
