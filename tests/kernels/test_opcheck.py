"""torch.library.opcheck for every flowtok:: custom op: the schema (mutations and aliasing as
declared), the fake implementation against the real one (shapes, dtypes, strides), the autograd
registration, and AOT dispatch with static and dynamic shapes, as torch.compile relies on them.
Small shapes: the ops run in the interpreter on CPU; in the GPU suite they run on CUDA."""
import pytest
import torch

from flowtok_fast.kernels import adaln, attention, flow_step, swiglu  # noqa: F401  (registers the ops)
from flowtok_fast import onednn_linear  # noqa: F401  (registers flowtok::onednn_linear)

F32, BF16 = torch.float32, torch.bfloat16


def _r(*shape, dtype=F32, grad=False, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


def _attention_args(rope: bool, grad: bool):
    qkv = _r(1, 20, 3, 2, 16, grad=grad)
    if not rope:
        return qkv, None, None
    angles = torch.rand(9, 16) * 6.28
    return qkv, angles.cos(), angles.sin()


def _attention_bwd_args():
    qkv, cos, sin = _attention_args(True, False)
    out, lse = torch.ops.flowtok.attention_fwd(qkv, cos, sin)
    return torch.randn_like(out), qkv, out, lse, cos, sin


def _stats(x):
    mean = x.float().mean(-1)
    rstd = (x.float().var(-1, unbiased=False) + 1e-6).rsqrt()
    return mean, rstd


def _ln_bwd_args():
    x, scale = _r(2, 5, 32), _r(2, 32, scale=0.5)
    return (torch.randn(2, 5, 32), x, scale, *_stats(x), F32)


def _grln_bwd_args(with_grad_res: bool):
    res, y, gate, scale = _r(2, 5, 32), _r(2, 5, 32), _r(2, 32), _r(2, 32, scale=0.5)
    grad_res = torch.randn(2, 5, 32) if with_grad_res else None
    return (torch.randn(2, 5, 32), grad_res, res, y, gate, scale, *_stats(res), F32, F32)


def _vecs(grad, dtype=F32):
    return _r(2, 32, dtype=dtype, grad=grad, scale=0.5), _r(2, 32, dtype=dtype, grad=grad, scale=0.5)


# op name -> list of (case id, zero-argument function building the args). Built lazily: inside
# the test, on the default device (CUDA in the GPU suite).
CASES = {
    "attention_fwd": [("rope", lambda: _attention_args(True, True)),
                      ("plain", lambda: _attention_args(False, True))],
    "attention_bwd": [("rope", _attention_bwd_args)],
    "ln_modulate": [("fp32", lambda: (_r(2, 5, 32, grad=True), *_vecs(True), 1e-6, F32)),
                    ("mixed_bf16_out", lambda: (_r(2, 5, 32, grad=True), *_vecs(True, BF16), 1e-6, BF16))],
    "ln_modulate_bwd": [("fp32", _ln_bwd_args)],
    "gated_residual": [("fp32", lambda: (_r(2, 5, 32, grad=True), _r(2, 5, 32, grad=True), _r(2, 32, grad=True))),
                       ("mixed", lambda: (_r(2, 5, 32, grad=True), _r(2, 5, 32, dtype=BF16, grad=True),
                                          _r(2, 32, dtype=BF16, grad=True)))],
    "gated_residual_bwd": [("fp32", lambda: (torch.randn(2, 5, 32), _r(2, 5, 32), _r(2, 32)))],
    "gated_residual_ln_modulate": [
        ("fp32", lambda: (_r(2, 5, 32, grad=True), _r(2, 5, 32, grad=True), _r(2, 32, grad=True),
                          *_vecs(True), 1e-6, F32))],
    "gated_residual_ln_modulate_bwd": [("with_grad_res", lambda: _grln_bwd_args(True)),
                                       ("no_grad_res", lambda: _grln_bwd_args(False))],
    "swiglu": [("fp32", lambda: (_r(2, 5, 48, grad=True),)),
               ("bf16", lambda: (_r(3, 40, dtype=BF16, grad=True),))],
    "swiglu_bwd": [("fp32", lambda: (torch.randn(2, 5, 24), _r(2, 5, 48)))],
    "gelu_tanh": [("bias", lambda: (_r(2, 5, 40, grad=True), _r(40, grad=True), F32)),
                  ("no_bias_bf16_out", lambda: (_r(2, 5, 40, grad=True), None, BF16))],
    "gelu_tanh_bwd": [("bias", lambda: (torch.randn(2, 5, 40), _r(2, 5, 40), _r(40))),
                      ("no_bias", lambda: (torch.randn(2, 5, 40), _r(2, 5, 40), None))],
    "cfg_euler_step_": [("tensors", lambda: (_r(2, 7, 16), _r(4, 7, 16), torch.tensor(0.05), 0.0,
                                             torch.tensor(2.0), 0.0)),
                        ("floats_vbf16", lambda: (_r(2, 7, 16), _r(4, 7, 16, dtype=BF16), None, 0.05, None, 2.0))],
    # a CPU op (oneDNN), inference only: CPU tensors on every machine, no gradients
    "onednn_linear": [("bias", lambda: (torch.randn(2, 5, 24, device="cpu"), torch.randn(40, 24, device="cpu"),
                                        torch.randn(40, device="cpu"))),
                      ("no_bias", lambda: (torch.randn(7, 24, device="cpu"), torch.randn(40, 24, device="cpu"), None))],
    "euler_step_": [("tensor", lambda: (_r(2, 7, 16), _r(2, 7, 16), torch.tensor(0.05), 0.0)),
                    ("float", lambda: (_r(2, 7, 16), _r(2, 7, 16), None, 0.05))],
}


def test_every_registered_op_has_a_case():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("flowtok::")}
    assert registered == set(CASES), f"ops without an opcheck case: {registered - set(CASES)}"


# The first case of each op gets every check; the others (other dtypes, None arguments) the
# schema and fake-implementation checks, which is where those variants differ: AOT dispatch
# costs seconds per case in the interpreter.
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
VARIANT_CHECKS = ("test_schema", "test_faketensor")


@pytest.mark.parametrize("op,make,checks", [
    pytest.param(op, make, ALL_CHECKS if i == 0 else VARIANT_CHECKS, id=f"{op}-{case}")
    for op, cases in CASES.items() for i, (case, make) in enumerate(cases)])
def test_opcheck(op, make, checks):
    torch.library.opcheck(getattr(torch.ops.flowtok, op).default, make(), test_utils=checks)
