"""MLP activations: SwiGLU on the packed ``w12`` output, and tanh-GELU with a fused bias.

    swiglu(x12)          = silu(x12[..., :h]) * x12[..., h:]          [..., 2h] -> [..., h]
    gelu_tanh(x, bias)   = gelu(x + bias, approximate="tanh")         [..., F]  -> [..., F]

Math runs in fp32 and is rounded once to the output dtype. Backward saves only the
pre-activation input (x12, or x and bias) and recomputes the activation. Rows are flattened to
[M, width] and tiled [BLOCK_M, BLOCK_N]; any width works (h = 2730 is not a multiple of
anything), the tail tile is masked.

tanh and sigmoid are written with exp (tanh(z) = 2 sigmoid(2z) - 1) so the same code runs in
Triton's CPU interpreter; in particular gelu_tanh(u) = u * sigmoid(2 k (u + 0.044715 u^3)),
which equals 0.5 u (1 + tanh(...)) without its cancellation for negative u.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_device, check_out_dtype, new_empty, round_to
from ._common import check_float as _check_float  # fused_linear.py calls swiglu._check_float

# Tiles: 4 rows x 512 features (2048 elements, 16 per thread with 4 warps).
_BLOCK_M, _BLOCK_N, _NUM_WARPS = 4, 512, 4
# Rows reduced per program in the GELU backward (d bias partials: [cdiv(M, 64), F] fp32).
_BIAS_ROWS = 64


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    # exp of -|x| only: never overflows, and keeps relative accuracy in the negative tail.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(X12, OUT, M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    rows = rows.to(tl.int64)[:, None]
    in_ptr = X12 + rows * (2 * H) + cols[None, :]
    x1 = tl.load(in_ptr, mask=mask, other=0.0).to(tl.float32)  # gate half
    x2 = tl.load(in_ptr + H, mask=mask, other=0.0).to(tl.float32)  # up half
    out = x1 * _sigmoid(x1) * x2
    tl.store(OUT + rows * H + cols[None, :], round_to(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(GRAD, X12, DX12, M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    rows = rows.to(tl.int64)[:, None]
    in_off = rows * (2 * H) + cols[None, :]
    x1 = tl.load(X12 + in_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X12 + in_off + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GRAD + rows * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(x1)
    # silu'(x) = s * (1 + x * (1 - s))
    dx1 = g * x2 * s * (1.0 + x1 * (1.0 - s))
    dx2 = g * x1 * s
    tl.store(DX12 + in_off, round_to(dx1, DX12.dtype.element_ty), mask=mask)
    tl.store(DX12 + in_off + H, round_to(dx2, DX12.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_fwd_kernel(X, BIAS, OUT, M, NF, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < NF)
    off = rows.to(tl.int64)[:, None] * NF + cols[None, :]
    u = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(BIAS + cols, mask=cols < NF, other=0.0).to(tl.float32)[None, :]
    # gelu_tanh(u) = 0.5 u (1 + tanh(K (u + C u^3))) = u * sigmoid(2 K (u + C u^3)),
    # K = sqrt(2 / pi) = 0.7978845608028654, C = 0.044715 (literals: the interpreter cannot
    # do arithmetic with constexpr globals)
    out = u * _sigmoid(2.0 * 0.7978845608028654 * (u + 0.044715 * u * u * u))
    tl.store(OUT + off, round_to(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(GRAD, X, BIAS, DX, DBIAS_PART, M, NF, HAS_BIAS: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (r, c) covers rows r*ROWS .. r*ROWS+ROWS-1, features of column block c, and writes
    # the fp32 partial d bias of those rows (summed over programs by torch: deterministic).
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NF
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_M):
        rows = pid_r * ROWS + r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * NF + cols[None, :]
        u = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += bias
        g = tl.load(GRAD + off, mask=mask, other=0.0).to(tl.float32)
        u2 = u * u
        s = _sigmoid(2.0 * 0.7978845608028654 * (u + 0.044715 * u2 * u))
        # d/du [u * sigmoid(2 z)] = s + u * s (1 - s) * 2 K (1 + 3 C u^2)   (K, C as in forward)
        du = g * (s + u * s * (1.0 - s) * (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * u2))
        tl.store(DX + off, round_to(du, DX.dtype.element_ty), mask=mask)
        acc += du  # masked elements have g = 0, so du = 0
    if HAS_BIAS:
        tl.store(DBIAS_PART + pid_r.to(tl.int64) * NF + cols, tl.sum(acc, axis=0), mask=cmask)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
def _grid(M: int, width: int):
    return (triton.cdiv(M, _BLOCK_M), triton.cdiv(width, _BLOCK_N))


@torch.library.custom_op("flowtok::swiglu", mutates_args=())
def _swiglu_op(x12: torch.Tensor) -> torch.Tensor:
    check_device(x12, op="swiglu")
    h = x12.shape[-1] // 2
    x2d = x12.contiguous().view(-1, 2 * h)
    out = new_empty((x2d.shape[0], h), like=x12)
    if out.numel() > 0:
        _swiglu_fwd_kernel[_grid(x2d.shape[0], h)](
            x2d, out, x2d.shape[0], h, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS)
    return out.view(*x12.shape[:-1], h)


@_swiglu_op.register_fake
def _(x12):
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


@torch.library.custom_op("flowtok::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(grad: torch.Tensor, x12: torch.Tensor) -> torch.Tensor:
    check_device(grad, x12, op="swiglu_bwd")
    h = x12.shape[-1] // 2
    x2d = x12.contiguous().view(-1, 2 * h)
    g2d = grad.contiguous().view(-1, h)
    dx12 = new_empty(x2d.shape, like=x12)
    if dx12.numel() > 0:
        _swiglu_bwd_kernel[_grid(x2d.shape[0], h)](
            g2d, x2d, dx12, x2d.shape[0], h, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS)
    return dx12.view(x12.shape)


@_swiglu_bwd_op.register_fake
def _(grad, x12):
    return x12.new_empty(x12.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad):
    (x12,) = ctx.saved_tensors
    return torch.ops.flowtok.swiglu_bwd(grad, x12)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("flowtok::gelu_tanh", mutates_args=())
def _gelu_tanh_op(x: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    check_device(x, bias, op="gelu_tanh")
    nf = x.shape[-1]
    x2d = x.contiguous().view(-1, nf)
    out = new_empty(x2d.shape, like=x, dtype=out_dtype)
    if out.numel() > 0:
        _gelu_fwd_kernel[_grid(x2d.shape[0], nf)](
            x2d, bias.contiguous() if bias is not None else x2d, out, x2d.shape[0], nf,
            HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS)
    return out.view(x.shape)


@_gelu_tanh_op.register_fake
def _(x, bias, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("flowtok::gelu_tanh_bwd", mutates_args=())
def _gelu_tanh_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dbias); dbias is an empty [0] tensor when there is no bias (an op cannot
    return None)."""
    check_device(grad, x, bias, op="gelu_tanh_bwd")
    nf = x.shape[-1]
    x2d = x.contiguous().view(-1, nf)
    g2d = grad.contiguous().view(-1, nf)
    M = x2d.shape[0]
    dx = new_empty(x2d.shape, like=x)
    n_part = triton.cdiv(M, _BIAS_ROWS)
    part = new_empty((n_part, nf) if bias is not None else (0,), like=x, dtype=torch.float32)
    if dx.numel() > 0:
        _gelu_bwd_kernel[(n_part, triton.cdiv(nf, _BLOCK_N))](
            g2d, x2d, bias.contiguous() if bias is not None else x2d, dx,
            part if bias is not None else dx, M, nf,
            HAS_BIAS=bias is not None, ROWS=_BIAS_ROWS, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
            num_warps=_NUM_WARPS)
    if bias is None:
        return dx.view(x.shape), x.new_empty((0,))
    return dx.view(x.shape), part.sum(dim=0).to(bias.dtype)


@_gelu_tanh_bwd_op.register_fake
def _(grad, x, bias):
    return x.new_empty(x.shape), (bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,)))


def _gelu_tanh_setup(ctx, inputs, output):
    x, bias, _ = inputs
    ctx.save_for_backward(x, bias)


def _gelu_tanh_backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.flowtok.gelu_tanh_bwd(grad, x, bias)
    return dx, (dbias if bias is not None else None), None


_gelu_tanh_op.register_autograd(_gelu_tanh_backward, setup_context=_gelu_tanh_setup)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def swiglu(x12: torch.Tensor) -> torch.Tensor:
    """``silu(x1) * x2`` with x1 = x12[..., :h] (gate), x2 = x12[..., h:] (up): [..., 2h] -> [..., h]."""
    if not isinstance(x12, torch.Tensor) or x12.dim() < 1 or x12.shape[-1] % 2 != 0 or x12.shape[-1] == 0:
        got = list(x12.shape) if isinstance(x12, torch.Tensor) else type(x12).__name__
        raise ValueError(f"swiglu: expected x12 of shape [..., 2h] (even last dim, h >= 1), got {got}")
    _check_float("swiglu", "x12", x12)
    check_device(x12, op="swiglu")
    return torch.ops.flowtok.swiglu(x12)


def gelu_tanh(x: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``gelu(x + bias, approximate="tanh")``; x [..., F], bias [F] or None.

    Output dtype: ``out_dtype``, default the promotion of (x, bias) like the eager reference."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"gelu_tanh: expected x of shape [..., F] with F >= 1, got {got}")
    _check_float("gelu_tanh", "x", x)
    if bias is not None:
        if tuple(bias.shape) != (x.shape[-1],):
            raise ValueError(f"gelu_tanh: expected bias of shape [{x.shape[-1]}], got {list(bias.shape)}")
        _check_float("gelu_tanh", "bias", bias)
        if bias.device != x.device:
            raise ValueError(f"gelu_tanh: expected bias on {x.device}, got {bias.device}")
    check_out_dtype("gelu_tanh", out_dtype)
    check_device(x, bias, op="gelu_tanh")
    if out_dtype is None:
        out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    return torch.ops.flowtok.gelu_tanh(x, bias, out_dtype)


# PyTorch references (also the production CPU path): defined once, in flowtok_fast/ops.py, so that
# the reference path imports neither Triton nor these kernels.
from flowtok_fast.ops import gelu_tanh_ref, swiglu_ref  # noqa: E402,F401
