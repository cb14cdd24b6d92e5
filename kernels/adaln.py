"""The DiT adaLN chain: LayerNorm (no affine) + modulate, gated residual, and both fused.

Shapes: x, y are [B, N, D] (tokens of B samples); gate, shift, scale are per-sample [B, D],
broadcast over the N tokens (they are chunks of the `adaLN_modulation` output, so they may be
strided views; only their last dimension needs unit stride).

    ln_modulate(x, shift, scale)      = layer_norm(x) * (1 + scale) + shift
    gated_residual(x, y, gate)        = x + gate * y
    gated_residual_ln_modulate(...)   = (res, ln_modulate(res, shift, scale)), res = x + gate * y

Kernels compute in fp32 whatever the storage dtypes (under autocast the residual stream is fp32
while y and the modulation vectors are bf16). The default output dtype is what the eager
reference gives (type promotion of the inputs); ``out_dtype`` asks for another dtype for the
modulated tensor (bf16 for the matmul that follows).

Backward saves only the LayerNorm input (x or the residual), the per-row mean and rstd (fp32),
scale, and for the gated forms y and gate; the normalised tensor is recomputed. Per-sample
gradients (shift, scale, gate) are reduced over tokens without atomics: each program sums a
chunk of rows of one sample into an fp32 partial, and torch sums the few partials, so results
are deterministic.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_out_dtype, new_empty, next_pow2
# round_to lives in _common; it stays importable from here, where other kernel files found it.
from ._common import round_to

# One row is held in registers; DiT widths go up to 1280 (next_pow2 = 2048).
_MAX_D = 4096
# Rows of one sample reduced by one backward program (N = 77 -> 10 programs per sample).
_BWD_ROWS = 8


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE,  # inputs; Y/GATE read only with HAS_GATE, SHIFT/SCALE with HAS_LN
    RES, MOD, MEAN, RSTD,  # outputs; RES only with HAS_GATE, MOD/MEAN/RSTD only with HAS_LN
    n_rows, N, D, stride_gate, stride_shift, stride_scale, eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_LN: tl.constexpr,
):
    # One program per tile of ROWS token rows (ROWS = 1 at DiT widths); whole rows (D <= BLOCK_D)
    # live in registers. A tile may straddle two samples, so the sample index is per row.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    mask = (rows < n_rows)[:, None] & dmask[None, :]
    b = (rows // N)[:, None]
    ptr_off = rows.to(tl.int64)[:, None] * D + offs[None, :]

    h = tl.load(X + ptr_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        y = tl.load(Y + ptr_off, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + b * stride_gate + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        h = h + gate * y
        # Normalise exactly the stored residual (as the eager reference and our backward do).
        h = round_to(h, RES.dtype.element_ty).to(tl.float32)
        tl.store(RES + ptr_off, h, mask=mask)
    if HAS_LN:
        eps = tl.cast(eps, tl.float32)  # scalars may arrive as fp64
        # Two-pass statistics in fp32 (no E[x^2] - E[x]^2 cancellation).
        mean = tl.sum(h, axis=1) / D
        hc = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(hc * hc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        shift = tl.load(SHIFT + b * stride_shift + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * stride_scale + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        out = hc * rstd[:, None] * (1.0 + scale) + shift
        tl.store(MOD + ptr_off, round_to(out, MOD.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rows < n_rows)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _adaln_bwd_kernel(
    DMOD, DRES, H, Y, GATE, SCALE, MEAN, RSTD,  # inputs (H = the LayerNorm input: x or res)
    DH, DY, PART,  # outputs: grad of H, grad of y, fp32 partials [B, n_chunks, 3, D]
    N, D, n_chunks, stride_gate, stride_scale,
    ROWS: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_GATE: tl.constexpr, HAS_DRES: tl.constexpr,
):
    # Program (b, c) handles rows c*ROWS .. c*ROWS+ROWS-1 of sample b, TILE_ROWS at a time, and
    # writes the per-sample partial sums of that chunk (slots: 0 = d shift, 1 = d scale,
    # 2 = d gate). All rows of a program share one sample, so the vectors are loaded once.
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    if HAS_LN:
        w = 1.0 + tl.load(SCALE + b * stride_scale + offs, mask=dmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gate + offs, mask=dmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)

    for r0 in range(0, ROWS, TILE_ROWS):
        n = c * ROWS + r0 + tl.arange(0, TILE_ROWS)
        valid = n < N
        mask = valid[:, None] & dmask[None, :]
        rows = b.to(tl.int64) * N + n
        ptr_off = rows[:, None] * D + offs[None, :]
        if HAS_DRES:
            dh = tl.load(DRES + ptr_off, mask=mask, other=0.0).to(tl.float32)
        else:
            dh = tl.zeros([TILE_ROWS, BLOCK_D], dtype=tl.float32)
        if HAS_LN:
            h = tl.load(H + ptr_off, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=valid, other=0.0)
            rstd = tl.load(RSTD + rows, mask=valid, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)  # recomputed, never saved
            g = tl.load(DMOD + ptr_off, mask=mask, other=0.0).to(tl.float32)
            acc_shift += tl.sum(g, axis=0)
            acc_scale += tl.sum(g * xhat, axis=0)
            # d xhat = g * (1 + scale); LayerNorm backward with both row means taken over D.
            wg = g * w[None, :]
            c1 = tl.sum(wg * xhat, axis=1) / D
            c2 = tl.sum(wg, axis=1) / D
            dh += (wg - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            tl.store(DH + ptr_off, round_to(dh, DH.dtype.element_ty), mask=mask)
        if HAS_GATE:
            y = tl.load(Y + ptr_off, mask=mask, other=0.0).to(tl.float32)
            acc_gate += tl.sum(dh * y, axis=0)
            tl.store(DY + ptr_off, round_to(dh * gate[None, :], DY.dtype.element_ty), mask=mask)

    part = PART + ((b.to(tl.int64) * n_chunks + c) * 3) * D + offs
    if HAS_LN:
        tl.store(part, acc_shift, mask=dmask)
        tl.store(part + D, acc_scale, mask=dmask)
    if HAS_GATE:
        tl.store(part + 2 * D, acc_gate, mask=dmask)


def _launch_params(D: int, backward: bool = False):
    """(BLOCK_D, rows per tile, num_warps) for rows of D features; shared by the launches and
    the GPU configs. A tile holds about 2048 elements: one row at DiT widths (D 1152/1280 ->
    BLOCK_D 2048), several rows for narrow D. The backward keeps about twice as many tiles live,
    so it spreads them over twice the warps (at D 1152 on sm_90, 8 warps would need ~164
    registers per thread)."""
    block = max(next_pow2(D), 16)
    tile_rows = max(1, min(_BWD_ROWS, 2048 // block))
    num_warps = 4 if block <= 1024 else (8 if block <= 2048 else 16)
    return block, tile_rows, min(16, num_warps * 2) if backward else num_warps


# --------------------------------------------------------------------------------------------
# Launchers (real tensors only)
# --------------------------------------------------------------------------------------------
def _vec(t: torch.Tensor) -> torch.Tensor:
    """A [B, D] modulation vector with unit stride along D (chunks of a Linear output are)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd(x, y, gate, shift, scale, eps, res_dtype, mod_dtype):
    """Runs the forward kernel. Returns (res or None, mod or None, mean or None, rstd or None)."""
    has_gate, has_ln = y is not None, shift is not None
    B, N, D = x.shape
    x = x.contiguous()
    res = mod = mean = rstd = None
    if has_gate:
        y, gate = y.contiguous(), _vec(gate)
        res = new_empty((B, N, D), like=x, dtype=res_dtype)
    if has_ln:
        shift, scale = _vec(shift), _vec(scale)
        mod = new_empty((B, N, D), like=x, dtype=mod_dtype)
        mean = new_empty((B, N), like=x, dtype=torch.float32)
        rstd = new_empty((B, N), like=x, dtype=torch.float32)
    if B * N > 0:
        block, tile_rows, num_warps = _launch_params(D)
        _adaln_fwd_kernel[(triton.cdiv(B * N, tile_rows),)](
            x, y if has_gate else x, gate if has_gate else x,
            shift if has_ln else x, scale if has_ln else x,
            res if has_gate else x, mod if has_ln else x,
            mean if has_ln else x, rstd if has_ln else x,
            B * N, N, D,
            gate.stride(0) if has_gate else 0,
            shift.stride(0) if has_ln else 0,
            scale.stride(0) if has_ln else 0,
            float(eps),
            ROWS=tile_rows, BLOCK_D=block, HAS_GATE=has_gate, HAS_LN=has_ln, num_warps=num_warps,
        )
    return res, mod, mean, rstd


def _bwd(dmod, dres, h, y, gate, scale, mean, rstd, dh_dtype, dy_dtype):
    """Runs the backward kernel. Returns (dh, dy, fp32 partial sums [B, n_chunks, 3, D])."""
    has_ln, has_gate = dmod is not None, y is not None
    B, N, D = (h if has_ln else y).shape
    like = h if has_ln else y
    dh = dy = None
    if has_ln:
        dmod, h, scale = dmod.contiguous(), h.contiguous(), _vec(scale)
        dh = new_empty((B, N, D), like=like, dtype=dh_dtype)
    if has_gate:
        y, gate = y.contiguous(), _vec(gate)
        dy = new_empty((B, N, D), like=like, dtype=dy_dtype)
    if dres is not None:
        dres = dres.contiguous()
    n_chunks = triton.cdiv(N, _BWD_ROWS)
    part = new_empty((B, n_chunks, 3, D), like=like, dtype=torch.float32)
    if B * n_chunks > 0:
        block, tile_rows, num_warps = _launch_params(D, backward=True)
        _adaln_bwd_kernel[(B, n_chunks)](
            dmod if has_ln else like, dres if dres is not None else like,
            h if has_ln else like, y if has_gate else like, gate if has_gate else like,
            scale if has_ln else like, mean if has_ln else like, rstd if has_ln else like,
            dh if has_ln else like, dy if has_gate else like, part,
            N, D, n_chunks,
            gate.stride(0) if has_gate else 0,
            scale.stride(0) if has_ln else 0,
            ROWS=_BWD_ROWS, TILE_ROWS=tile_rows, BLOCK_D=block,
            HAS_LN=has_ln, HAS_GATE=has_gate, HAS_DRES=dres is not None,
            num_warps=num_warps,
        )
    return dh, dy, part


def _reduce(part, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample gradient from the chunk partials (a fresh tensor: op outputs must not alias)."""
    return part[:, :, slot].sum(dim=1).to(dtype)


# --------------------------------------------------------------------------------------------
# Custom ops: forward, fake (shapes/dtypes only), backward ops and autograd wiring. Every op
# returns fresh contiguous tensors, and the fakes say so (new_empty, not empty_like, whose
# strides would follow a strided input).
# --------------------------------------------------------------------------------------------
def _stats_like(x):
    B, N, _ = x.shape
    return x.new_empty((B, N), dtype=torch.float32), x.new_empty((B, N), dtype=torch.float32)


@torch.library.custom_op("flowtok::ln_modulate", mutates_args=())
def _ln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(x, shift, scale, op="ln_modulate")
    _, mod, mean, rstd = _fwd(x, None, None, shift, scale, eps, None, out_dtype)
    return mod, mean, rstd


@_ln_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return (x.new_empty(x.shape, dtype=out_dtype), *_stats_like(x))


@torch.library.custom_op("flowtok::ln_modulate_bwd", mutates_args=())
def _ln_modulate_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, shift_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(grad, x, scale, mean, rstd, op="ln_modulate_bwd")
    dx, _, part = _bwd(grad, None, x, None, None, scale, mean, rstd, x.dtype, None)
    return dx, _reduce(part, 0, shift_dtype), _reduce(part, 1, scale.dtype)


@_ln_modulate_bwd_op.register_fake
def _(grad, x, scale, mean, rstd, shift_dtype):
    return (x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=shift_dtype),
            scale.new_empty(scale.shape))


def _ln_modulate_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _ln_modulate_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.flowtok.ln_modulate_bwd(grad, x, scale, mean, rstd, ctx.shift_dtype)
    return dx, dshift, dscale, None, None


_ln_modulate_op.register_autograd(_ln_modulate_backward, setup_context=_ln_modulate_setup)


@torch.library.custom_op("flowtok::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    check_device(x, y, gate, op="gated_residual")
    res_dtype = _promote(x, y, gate)
    return _fwd(x, y, gate, None, None, 0.0, res_dtype, None)[0]


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape, dtype=_promote(x, y, gate))


@torch.library.custom_op("flowtok::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(
    grad: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(grad, y, gate, op="gated_residual_bwd")
    _, dy, part = _bwd(None, grad, None, y, gate, None, None, None, None, y.dtype)
    return dy, _reduce(part, 2, gate.dtype)


@_gated_residual_bwd_op.register_fake
def _(grad, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_residual_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gated_residual_backward(ctx, grad):
    y, gate = ctx.saved_tensors
    dy, dgate = torch.ops.flowtok.gated_residual_bwd(grad, y, gate)
    # d res / d x is the identity: no kernel needed (a cast at most).
    return grad.to(ctx.x_dtype), dy, dgate


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


@torch.library.custom_op("flowtok::gated_residual_ln_modulate", mutates_args=())
def _gated_residual_ln_modulate_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, eps: float, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(x, y, gate, shift, scale, op="gated_residual_ln_modulate")
    return _fwd(x, y, gate, shift, scale, eps, _promote(x, y, gate), out_dtype)


@_gated_residual_ln_modulate_op.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype):
    res = x.new_empty(x.shape, dtype=_promote(x, y, gate))
    return (res, x.new_empty(x.shape, dtype=out_dtype), *_stats_like(x))


@torch.library.custom_op("flowtok::gated_residual_ln_modulate_bwd", mutates_args=())
def _gated_residual_ln_modulate_bwd_op(
    grad_mod: torch.Tensor, grad_res: Optional[torch.Tensor], res: torch.Tensor, y: torch.Tensor,
    gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    x_dtype: torch.dtype, shift_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(grad_mod, grad_res, res, y, gate, scale, mean, rstd, op="gated_residual_ln_modulate_bwd")
    dx, dy, part = _bwd(grad_mod, grad_res, res, y, gate, scale, mean, rstd, x_dtype, y.dtype)
    return (dx, dy, _reduce(part, 2, gate.dtype), _reduce(part, 0, shift_dtype),
            _reduce(part, 1, scale.dtype))


@_gated_residual_ln_modulate_bwd_op.register_fake
def _(grad_mod, grad_res, res, y, gate, scale, mean, rstd, x_dtype, shift_dtype):
    return (
        res.new_empty(res.shape, dtype=x_dtype), y.new_empty(y.shape), gate.new_empty(gate.shape),
        scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape),
    )


def _gated_residual_ln_modulate_setup(ctx, inputs, output):
    x, y, gate, shift, scale, _, _ = inputs
    res, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # res is the LayerNorm input (and the next block's residual, alive anyway); y and gate are
    # needed for d gate and d y. The normalised tensor is recomputed in backward.
    ctx.save_for_backward(res, y, gate, scale, mean, rstd)
    ctx.x_dtype, ctx.shift_dtype = x.dtype, shift.dtype


def _gated_residual_ln_modulate_backward(ctx, grad_res, grad_mod, _grad_mean, _grad_rstd):
    res, y, gate, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = torch.ops.flowtok.gated_residual_ln_modulate_bwd(
        grad_mod, grad_res, res, y, gate, scale, mean, rstd, ctx.x_dtype, ctx.shift_dtype
    )
    return dx, dy, dgate, dshift, dscale, None, None


_gated_residual_ln_modulate_op.register_autograd(
    _gated_residual_ln_modulate_backward, setup_context=_gated_residual_ln_modulate_setup
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _promote(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _validate(op, x, y=None, gate=None, shift=None, scale=None, out_dtype=None):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: expected x of shape [B, N, D], got {got}")
    B, N, D = x.shape
    named = {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale}
    for name, t in named.items():
        if t is None:
            continue
        want = (B, N, D) if name in ("x", "y") else (B, D)
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: expected {name} of shape {list(want)}, got {list(t.shape)}")
        check_float(op, name, t)
        if t.device != x.device:
            raise ValueError(f"{op}: expected {name} on {x.device}, got {t.device}")
    check_out_dtype(op, out_dtype)
    if not 1 <= D <= _MAX_D:
        raise ValueError(f"{op}: expected 1 <= D <= {_MAX_D} (a row is held in registers), got D={D}")
    check_device(*[t for t in named.values() if t is not None], op=op)


def ln_modulate(x, shift, scale, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None):
    """LayerNorm over D without affine, then ``* (1 + scale) + shift`` (per sample).

    x [B, N, D]; shift, scale [B, D]. Returns [B, N, D] in ``out_dtype`` (default: promotion of
    the input dtypes, like the eager reference)."""
    _validate("ln_modulate", x, shift=shift, scale=scale, out_dtype=out_dtype)
    out_dtype = out_dtype or _promote(x, shift, scale)
    return torch.ops.flowtok.ln_modulate(x, shift, scale, float(eps), out_dtype)[0]


def gated_residual(x, y, gate):
    """``x + gate[:, None] * y``; x, y [B, N, D], gate [B, D]. Output dtype: promotion."""
    _validate("gated_residual", x, y=y, gate=gate)
    return torch.ops.flowtok.gated_residual(x, y, gate)


def gated_residual_ln_modulate(x, y, gate, shift, scale, eps: float = 1e-6,
                               out_dtype: Optional[torch.dtype] = None):
    """Fused ``res = x + gate * y; mod = ln_modulate(res, shift, scale)`` in one pass.

    Returns ``(res, mod)``: res in the promotion of (x, y, gate), mod in ``out_dtype`` (default:
    promotion of (res, shift, scale))."""
    _validate("gated_residual_ln_modulate", x, y=y, gate=gate, shift=shift, scale=scale,
              out_dtype=out_dtype)
    out_dtype = out_dtype or _promote(x, y, gate, shift, scale)
    res, mod, _, _ = torch.ops.flowtok.gated_residual_ln_modulate(x, y, gate, shift, scale,
                                                                  float(eps), out_dtype)
    return res, mod


# PyTorch references (also the production CPU path): defined once, in flowtok_fast/ops.py, so that
# the reference path imports neither Triton nor these kernels.
from flowtok_fast.ops import gated_residual_ln_modulate_ref, gated_residual_ref, ln_modulate_ref  # noqa: E402,F401
