"""Elementwise kernels fused with the Linear that consumes their output, for training memory.

A Linear saves its input for the weight gradient. When that input is the output of a cheap
elementwise op (LayerNorm + modulate, GELU, SwiGLU), saving it costs a full activation per
token although it can be recomputed from what backward keeps anyway (the residual and two
fp32 row statistics, or the pre-activation). These ops save only that and recompute the
Linear's input in backward with one more pass of the Triton kernel:

    modulated_linear(x, shift, scale, lin)            = lin(ln_modulate(x, shift, scale))
    gated_residual_modulated_linear(x, y, gate, ...)  = (res, lin(ln_modulate(res, ...))), res = x + gate*y
    gelu_linear(a, lin)                               = lin(gelu_tanh(a))
    swiglu_linear(x12, lin)                           = lin(swiglu(x12))

The matmuls stay ordinary aten ops (visible to Inductor); the recompute costs one elementwise
pass per op, a few percent of a block's FLOPs and none of its GEMMs. Under autocast the
matmuls run in the autocast dtype as they would in `nn.Linear`. `*_ref` are the plain
compositions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import adaln, swiglu

LN_EPS = 1e-6


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here: autocast's when enabled, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _linear_fwd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dt = h.dtype
    return F.linear(h, weight.to(dt), None if bias is None else bias.to(dt))


def _linear_bwd(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """(d input, d weight, d bias) of out = h @ W^T + b, computed in h's dtype, fp32 bias sum."""
    dt = h.dtype
    g = grad.to(dt)
    g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
    dweight = (g2.t() @ h2).to(weight.dtype)
    dbias = g2.float().sum(0).to(weight.dtype) if has_bias else None
    return g @ weight.to(dt), dweight, dbias


class _ModulatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias):
        dt = _matmul_dtype(x, weight)
        h, mean, rstd = torch.ops.flowtok.ln_modulate(x, shift, scale, LN_EPS, dt)
        ctx.save_for_backward(x, shift, scale, mean, rstd, weight)
        ctx.has_bias = bias is not None
        return _linear_fwd(h, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        # grad carries the forward matmul's dtype: recompute the Linear's input in it
        x, shift, scale, mean, rstd, weight = ctx.saved_tensors
        h = torch.ops.flowtok.ln_modulate(x, shift, scale, LN_EPS, grad.dtype)[0]
        dh, dweight, dbias = _linear_bwd(grad, h, weight, ctx.has_bias)
        dx, dshift, dscale = torch.ops.flowtok.ln_modulate_bwd(dh, x, scale, mean, rstd, shift.dtype)
        return dx, dshift, dscale, dweight, dbias


class _GatedResidualModulatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, weight, bias):
        dt = _matmul_dtype(x, weight)
        res, h, mean, rstd = torch.ops.flowtok.gated_residual_ln_modulate(x, y, gate, shift, scale, LN_EPS, dt)
        # res is the next sub-block's residual, alive anyway; h is recomputed from it
        ctx.save_for_backward(res, y, gate, shift, scale, mean, rstd, weight)
        ctx.has_bias, ctx.x_dtype = bias is not None, x.dtype
        return res, _linear_fwd(h, weight, bias)

    @staticmethod
    def backward(ctx, grad_res, grad_out):
        res, y, gate, shift, scale, mean, rstd, weight = ctx.saved_tensors
        h = torch.ops.flowtok.ln_modulate(res, shift, scale, LN_EPS, grad_out.dtype)[0]
        dh, dweight, dbias = _linear_bwd(grad_out, h, weight, ctx.has_bias)
        dx, dy, dgate, dshift, dscale = torch.ops.flowtok.gated_residual_ln_modulate_bwd(
            dh, grad_res, res, y, gate, scale, mean, rstd, ctx.x_dtype, shift.dtype
        )
        return dx, dy, dgate, dshift, dscale, dweight, dbias


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias):
        dt = _matmul_dtype(a, weight)
        ctx.save_for_backward(a, weight)
        ctx.has_bias = bias is not None
        return _linear_fwd(torch.ops.flowtok.gelu_tanh(a, None, dt), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        a, weight = ctx.saved_tensors
        g = torch.ops.flowtok.gelu_tanh(a, None, grad.dtype)
        dg, dweight, dbias = _linear_bwd(grad, g, weight, ctx.has_bias)
        da = torch.ops.flowtok.gelu_tanh_bwd(dg.to(a.dtype), a, None)[0]
        return da, dweight, dbias


class _SwigluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x12, weight, bias):
        ctx.save_for_backward(x12, weight)
        ctx.has_bias = bias is not None
        h = torch.ops.flowtok.swiglu(x12)
        return _linear_fwd(h.to(_matmul_dtype(x12, weight)), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x12, weight = ctx.saved_tensors
        h = torch.ops.flowtok.swiglu(x12).to(grad.dtype)
        dh, dweight, dbias = _linear_bwd(grad, h, weight, ctx.has_bias)
        return torch.ops.flowtok.swiglu_bwd(dh.to(x12.dtype), x12), dweight, dbias


# ------------------------------------------------------------------ public API (lin: nn.Linear)


def modulated_linear(x, shift, scale, lin: nn.Linear):
    adaln._validate("modulated_linear", x, shift=shift, scale=scale)
    return _ModulatedLinear.apply(x, shift, scale, lin.weight, lin.bias)


def gated_residual_modulated_linear(x, y, gate, shift, scale, lin: nn.Linear):
    adaln._validate("gated_residual_modulated_linear", x, y=y, gate=gate, shift=shift, scale=scale)
    return _GatedResidualModulatedLinear.apply(x, y, gate, shift, scale, lin.weight, lin.bias)


def gelu_linear(a, lin: nn.Linear):
    swiglu._check_float("gelu_linear", "a", a)
    return _GeluLinear.apply(a, lin.weight, lin.bias)


def swiglu_linear(x12, lin: nn.Linear):
    if x12.shape[-1] != 2 * lin.in_features:
        raise ValueError(f"swiglu_linear: expected x12 of shape [..., {2 * lin.in_features}], got {list(x12.shape)}")
    swiglu._check_float("swiglu_linear", "x12", x12)
    return _SwigluLinear.apply(x12, lin.weight, lin.bias)


# PyTorch references (also the production CPU path): defined once, in flowtok_fast/ops.py, so that
# the reference path imports neither Triton nor these kernels.
from flowtok_fast.ops import (  # noqa: E402,F401
    gated_residual_modulated_linear_ref, gelu_linear_ref, modulated_linear_ref, swiglu_linear_ref)
