"""Bitwise determinism of every backward that reduces across programs: the adaLN chain (per-sample
shift / scale / gate gradients from chunk partials), the GELU bias gradient (row-block
partials) and attention (dk / dv over all queries, dq over all keys): two identical runs must
give identical bits, as the kernels use no atomics.

What this shows where. On CUDA (the GPU suite; FLOWTOK_KERNEL_SHAPES=real for the real shapes)
the programs of a kernel run concurrently in an order that changes from run to run, so an
accumulation through atomics would give different bits between runs; the control test proves
the harness sees that, with index_add_ (atomicAdd on CUDA). On the CPU, Triton's interpreter
runs the programs one after another in grid order: two runs are equal whatever the kernel does,
so here the test shows only that a backward carries no state between runs (a buffer read
before it is written, a stale cache); it cannot show the absence of atomics, and the control
cannot run (CPU index_add_ is sequential)."""
import pytest
import torch

from flowtok_fast.kernels import adaln, attention, swiglu
from .shapes import REAL
from .utils import kernel_device

ON_CUDA = kernel_device().type == "cuda"


def _grads_twice(fn, inputs, grads_out):
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        runs.append(torch.autograd.grad(outs, leaves, grads_out))
    return runs


def _assert_same_bits(fn, inputs, grads_out, name):
    first, second = _grads_twice(fn, inputs, grads_out)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{name}: gradient {i} differs between two identical runs"


def test_adaln_backward_is_deterministic():
    B, N, D = (64, 77, 1152) if REAL else (2, 20, 64)
    x, y = torch.randn(B, N, D), torch.randn(B, N, D).bfloat16()
    ada = (0.5 * torch.randn(B, 3 * D)).bfloat16()

    def fn(x, y, ada):
        shift, scale, gate = ada.chunk(3, dim=1)
        return adaln.gated_residual_ln_modulate(x, y, gate, shift, scale, out_dtype=torch.bfloat16)

    _assert_same_bits(fn, (x, y, ada), (torch.randn(B, N, D), torch.randn(B, N, D).bfloat16()),
                      "gated_residual_ln_modulate")


def test_gelu_bias_backward_is_deterministic():
    shape = (64, 77, 4608) if REAL else (2, 70, 64)  # 3 row blocks of partials
    x, bias = torch.randn(shape).bfloat16(), torch.randn(shape[-1])
    _assert_same_bits(lambda x, b: swiglu.gelu_tanh(x, b, out_dtype=torch.bfloat16), (x, bias),
                      (torch.randn(shape).bfloat16(),), "gelu_tanh")


def test_attention_backward_is_deterministic():
    B, N, H, hd, R = (8, 410, 16, 64, 256) if REAL else (1, 77, 1, 32, 49)
    qkv = torch.randn(B, N, 3, H, hd).bfloat16()
    angles = torch.rand(R, hd) * 6.28
    _assert_same_bits(lambda q: attention.attention(q, angles.cos(), angles.sin()), (qkv,),
                      (torch.randn(B, N, H * hd).bfloat16(),), "attention")


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: on the CPU every reduction is sequential, so "
                                        "there is no nondeterminism to detect")
def test_control_the_harness_detects_atomics():
    # 4M fp32 values added into 8 slots with atomicAdd: the order, and so the rounding, changes
    # between runs. If this never differs, the comparison above could not fail either.
    values = torch.randn(1 << 22, device="cuda")
    index = torch.randint(0, 8, (1 << 22,), device="cuda")
    results = [torch.zeros(8, device="cuda").index_add_(0, index, values) for _ in range(5)]
    assert any(not torch.equal(results[0], r) for r in results[1:]), \
        "index_add_ gave identical bits 5 times: the determinism tests cannot detect atomics"
