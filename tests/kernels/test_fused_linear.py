"""Elementwise op + Linear with recompute-in-backward: values, every gradient, saved bytes."""
import pytest
import torch
from torch import nn

from flowtok_fast.kernels import fused_linear as fl
from .shapes import real
from .utils import assert_within_ref_error, poisoned_outputs, saved_bytes


def _grads(fn, inputs, lin, grad_outs):
    for t in inputs:
        t.grad = None
    lin.zero_grad(set_to_none=True)
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grad_outs)
    return [o.detach() for o in outs], [t.grad for t in inputs] + [lin.weight.grad, lin.bias.grad]


def _check(op, ref, make_inputs, lin, dtype):
    """op and ref at `dtype`; the exact answer from ref in fp64 on the same values."""
    inputs = [t.to(dtype).requires_grad_() for t in make_inputs()]
    lin_d = lin.to(dtype)
    exact_in = [t.detach().double().requires_grad_() for t in inputs]
    lin64 = nn.Linear(lin.in_features, lin.out_features).double()
    lin64.load_state_dict({k: v.double() for k, v in lin_d.state_dict().items()})
    outs64 = ref(*exact_in, lin64)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    grad_outs = [torch.randn_like(o) for o in outs64]
    torch.autograd.backward(outs64, grad_outs)
    exact = [o.detach() for o in outs64], [t.grad for t in exact_in] + [lin64.weight.grad, lin64.bias.grad]
    gd = [g.to(dtype) for g in grad_outs]
    with poisoned_outputs():
        got = _grads(lambda: op(*inputs, lin_d), inputs, lin_d, gd)
    same = _grads(lambda: ref(*inputs, lin_d), inputs, lin_d, gd)
    for i, (a, b, c) in enumerate(zip(got[0], same[0], exact[0])):
        assert_within_ref_error(a, b, c, name=f"out{i}")
    for i, (a, b, c) in enumerate(zip(got[1], same[1], exact[1])):
        assert_within_ref_error(a, b, c, name=f"grad{i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(1, 77, 200), (3, 13, 1152)] + real([(16, 77, 1152), (16, 77, 1280)]))
def test_modulated_linears(B, N, D, dtype):
    lin = nn.Linear(D, 48)
    mk = lambda: [torch.randn(B, N, D), torch.randn(B, D) * 0.5, torch.randn(B, D) * 0.5]  # noqa: E731
    _check(fl.modulated_linear, fl.modulated_linear_ref, mk, lin, dtype)
    mk2 = lambda: [torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(B, D), torch.randn(B, D), torch.randn(B, D)]  # noqa: E731
    _check(fl.gated_residual_modulated_linear, fl.gated_residual_modulated_linear_ref, mk2, lin, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_and_swiglu_linears(dtype):
    _check(fl.gelu_linear, fl.gelu_linear_ref, lambda: [torch.randn(3, 77, 96) * 2], nn.Linear(96, 40), dtype)
    _check(fl.swiglu_linear, fl.swiglu_linear_ref, lambda: [torch.randn(1, 41, 2 * 2730)], nn.Linear(2730, 24), dtype)


def test_fused_linears_save_only_the_input_not_the_activation():
    B, N, D, F = 2, 77, 64, 256
    # shift and scale come from the adaLN Linear in training, so they need gradients too
    x, shift, scale = (torch.randn(s, requires_grad=True) for s in ((B, N, D), (B, D), (B, D)))
    lin = nn.Linear(D, F)
    fused = saved_bytes(lambda: fl.modulated_linear(x, shift, scale, lin))
    ref = saved_bytes(lambda: fl.modulated_linear_ref(x, shift, scale, lin))
    act = B * N * D * 4
    assert ref - fused >= 2 * act - 1024  # the reference keeps the normalised and modulated copies
    a, lin2 = torch.randn(B, N, F, requires_grad=True), nn.Linear(F, D)
    fused = saved_bytes(lambda: fl.gelu_linear(a, lin2))
    ref = saved_bytes(lambda: fl.gelu_linear_ref(a, lin2))
    assert ref - fused >= B * N * F * 4  # the GELU output is recomputed, not kept


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x12 of shape \[\.\.\., 20\]"):
        fl.swiglu_linear(torch.randn(2, 8), nn.Linear(10, 3))
    with pytest.raises(ValueError, match="shift"):
        fl.modulated_linear(torch.randn(2, 5, 8), torch.randn(3, 8), torch.randn(2, 8), nn.Linear(8, 4))
