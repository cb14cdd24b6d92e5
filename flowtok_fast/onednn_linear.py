"""fp32 linears through oneDNN on a CPU, for the compiled samplers (fast_sampler.py).

torch sends an fp32 `F.linear` on a CPU to MKL's sgemm, and Inductor's frozen-weight path keeps it
there (mkl._mkl_linear). On AMD EPYC (this project's CI machines) MKL takes a slow code path: a
[1232, 768] x [768, 3072] fp32 linear on one thread runs at 65-93 GFLOP/s through MKL and 146-179
through oneDNN (mkldnn._linear_pointwise, same fp32 math, a different summation order: max error
vs fp64 1.2e-4 vs MKL's 6e-5, K = 768). The B generator's flow loop is ~90% GEMM in fp32, so this
is the whole fp32 lever: 1.97x at B (docs/PERFORMANCE.md, "CPU inference").

`linears()` is a TorchFunctionMode: inside it, every fp32 CPU `F.linear` under no_grad and outside
autocast becomes
`flowtok::onednn_linear`, a custom op that Inductor calls as an opaque kernel and fuses around.
Applied around the compiled call, never inside a model (as ops.py does for kernels); bf16
(autocast) and CUDA linears pass through untouched. Inference only: the op has no backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _aten_linear(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("flowtok::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for fp32 CPU tensors, computed by oneDNN."""
    return _aten_linear(x.contiguous(), weight, bias)


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


class _Linears(TorchFunctionMode):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # inference only (no backward), and autocast's linears are its own (bf16)
        if func is F.linear and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            x, weight, bias = list(args) + [kwargs.get(k) for k in ("input", "weight", "bias")[len(args):]]
            if all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in (x, weight, bias)):
                return self.linear(x, weight, bias)
        return func(*args, **kwargs)


def linears(for_export: bool = False):
    """Context: fp32 CPU linears through oneDNN (a no-op where torch has no oneDNN). for_export:
    around torch.export of an AOTInductor package, the ATen op itself (`mkldnn._linear_pointwise`,
    which the package calls from C++ with no Python; Inductor's JIT lowering of it wants prepacked
    constant weights, hence the custom op there). B's fp32 flow step in a package: 2.01x."""
    if not available():
        return contextlib.nullcontext()
    return _Linears(_aten_linear if for_export else onednn_linear)
