"""The sampler's Euler update, with classifier-free guidance folded in, done in place.

    cfg_euler_step_(x, v, dt, scale):  x += dt * (v_u + scale * (v_c - v_u))
        x [B, ...]; v [2B, ...] is the model output of the doubled batch:
        v_c = v[:B] (conditional, indicator 0), v_u = v[B:] (null, indicator 1).
    euler_step_(x, v, dt):             x += dt * v      (no guidance; v [B, ...])

dt and scale may be Python floats or one-element tensors on x's device. Tensors are read inside
the kernel (no .item(), no host synchronisation), so the step can live in a captured CUDA graph
while the schedule tensors change between replays. Math runs in fp32 and is stored in x's dtype.

These ops mutate x and have no autograd (sampling runs under no_grad / inference_mode).
"""
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, round_to

_BLOCK, _NUM_WARPS = 1024, 4
Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_scalar(ptr, value, FROM_PTR: tl.constexpr):
    # A device tensor is read here (sync-free); a Python float arrives as an argument, possibly
    # as fp64 from Inductor-generated launchers, hence the cast.
    if FROM_PTR:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.cast(value, tl.float32)


@triton.jit
def _euler_step_kernel(
    X, V, DT, dt_value, SCALE, scale_value, n_elem,
    CFG: tl.constexpr, DT_PTR: tl.constexpr, SCALE_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    dt = _load_scalar(DT, dt_value, DT_PTR)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        s = _load_scalar(SCALE, scale_value, SCALE_PTR)
        v_c = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)  # v[:B]
        v_u = tl.load(V + n_elem + offs, mask=mask, other=0.0).to(tl.float32)  # v[B:]
        v = v_u + s * (v_c - v_u)
    else:
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(X + offs, round_to(x + dt * v, X.dtype.element_ty), mask=mask)


def _launch(x, v, dt_t, dt_f, scale_t, scale_f, cfg: bool):
    # Work on a contiguous buffer; a non-contiguous x gets the result copied back.
    xc = x if x.is_contiguous() else x.contiguous()
    v = v.contiguous()
    n = xc.numel()
    if n > 0:
        _euler_step_kernel[(triton.cdiv(n, _BLOCK),)](
            xc, v, dt_t if dt_t is not None else xc, dt_f,
            scale_t if scale_t is not None else xc, scale_f, n,
            CFG=cfg, DT_PTR=dt_t is not None, SCALE_PTR=scale_t is not None,
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    if xc is not x:
        x.copy_(xc)


# --------------------------------------------------------------------------------------------
# Custom ops (mutating x; no autograd)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("flowtok::cfg_euler_step_", mutates_args=("x",))
def _cfg_euler_step_op(
    x: torch.Tensor, v: torch.Tensor, dt_t: Optional[torch.Tensor], dt_f: float,
    scale_t: Optional[torch.Tensor], scale_f: float,
) -> None:
    check_device(x, v, dt_t, scale_t, op="cfg_euler_step_")
    _launch(x, v, dt_t, dt_f, scale_t, scale_f, cfg=True)


@_cfg_euler_step_op.register_fake
def _(x, v, dt_t, dt_f, scale_t, scale_f):
    return None


@torch.library.custom_op("flowtok::euler_step_", mutates_args=("x",))
def _euler_step_op(x: torch.Tensor, v: torch.Tensor, dt_t: Optional[torch.Tensor], dt_f: float) -> None:
    check_device(x, v, dt_t, op="euler_step_")
    _launch(x, v, dt_t, dt_f, None, 0.0, cfg=False)


@_euler_step_op.register_fake
def _(x, v, dt_t, dt_f):
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _split_scalar(op: str, name: str, value: Scalar, x: torch.Tensor):
    """(tensor or None, float) for the op schema: a tensor goes by pointer, a number by value."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{op}: expected {name} as a float or a 0-dim tensor, got shape {list(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{op}: expected {name} of a floating dtype, got {value.dtype}")
        if value.device != x.device:
            raise ValueError(f"{op}: expected {name} on {x.device} (no host sync), got {value.device}")
        return value, 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None, float(value)
    raise ValueError(f"{op}: expected {name} as a float or a 0-dim tensor, got {type(value).__name__}")


def _validate(op: str, x, v, n_branches: int):
    for name, t in (("x", x), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: expected {name} to be a tensor, got {type(t).__name__}")
        check_float(op, name, t)
    if x.dim() < 1:
        raise ValueError(f"{op}: expected x of shape [B, ...], got {list(x.shape)}")
    want = [n_branches * x.shape[0], *x.shape[1:]]
    if list(v.shape) != want:
        what = "[2B, ...] (conditional rows then null rows)" if n_branches == 2 else "x's shape"
        raise ValueError(f"{op}: expected v of shape {want} = {what}, got {list(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{op}: expected v on {x.device}, got {v.device}")


def cfg_euler_step_(x: torch.Tensor, v: torch.Tensor, dt: Scalar, scale: Scalar) -> None:
    """In place: ``x += dt * (v_u + scale * (v_c - v_u))``, v_c = v[:B], v_u = v[B:]."""
    _validate("cfg_euler_step_", x, v, 2)
    dt_t, dt_f = _split_scalar("cfg_euler_step_", "dt", dt, x)
    scale_t, scale_f = _split_scalar("cfg_euler_step_", "scale", scale, x)
    # Bad arguments (ValueError) are reported before a device the kernel cannot run on.
    check_device(x, v, op="cfg_euler_step_")
    torch.ops.flowtok.cfg_euler_step_(x, v, dt_t, dt_f, scale_t, scale_f)


def euler_step_(x: torch.Tensor, v: torch.Tensor, dt: Scalar) -> None:
    """In place: ``x += dt * v`` (no guidance)."""
    _validate("euler_step_", x, v, 1)
    dt_t, dt_f = _split_scalar("euler_step_", "dt", dt, x)
    check_device(x, v, op="euler_step_")
    torch.ops.flowtok.euler_step_(x, v, dt_t, dt_f)


# PyTorch references (also the production CPU path): defined once, in flowtok_fast/ops.py, so that They update
# x IN PLACE and return it; dt / scale: floats or 0-dim tensors. The reference path imports neither Triton nor these kernels.
from flowtok_fast.ops import cfg_euler_step_ref, euler_step_ref  # noqa: E402,F401
