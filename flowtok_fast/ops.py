"""THE ops layer: every fusable op the models call, with an explicit implementation choice.

`"reference"` is plain PyTorch (below; the same math as the `*_ref` functions beside each
kernel, exactly the original implementation's); `"triton"` is the fused kernels in
`flowtok_fast.kernels`, imported only when asked for. Asking for
an implementation that cannot run is an error, never a silent fallback.

Models never import kernels: each module that calls an op holds an `ops` attribute (an `Ops`
namespace) and `use(model, impl)` swaps it from outside, so kernel choice is applied around
the model, not woven into it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flowtok_fast.errors import UserError

IMPLS = ("reference", "triton")


@dataclass(frozen=True)
class Ops:
    name: str
    # attention(qkv [B,N,3,H,hd], rope_cos [R,hd] | None, rope_sin [R,hd] | None) -> [B,N,H*hd]
    attention: Callable
    # swiglu(x12 [...,2h]) -> silu(x12[..., :h]) * x12[..., h:]
    swiglu: Callable
    # gelu_tanh(x) -> GELU with the tanh approximation
    gelu_tanh: Callable
    # ln_modulate(x [B,N,D], shift [B,D], scale [B,D]) -> LayerNorm(x, eps 1e-6) * (1 + scale) + shift
    ln_modulate: Callable
    # gated_residual(x [B,N,D], y [B,N,D], gate [B,D]) -> x + gate * y
    gated_residual: Callable
    # gated_residual_ln_modulate(x, y, gate, shift, scale) -> (x + gate * y, ln_modulate(that, ...))
    gated_residual_ln_modulate: Callable
    # cfg_euler_step_(x [B,...], v [2B,...], dt, scale): in place x += dt * (v_u + s * (v_c - v_u))
    cfg_euler_step_: Callable
    # euler_step_(x, v, dt): in place x += dt * v
    euler_step_: Callable
    # Elementwise op + the Linear consuming it (fused: backward recomputes the Linear's input):
    # modulated_linear(x, shift, scale, lin) = lin(ln_modulate(x, shift, scale))
    modulated_linear: Callable
    # gated_residual_modulated_linear(x, y, gate, shift, scale, lin) -> (res, lin(ln_modulate(res)))
    gated_residual_modulated_linear: Callable
    # gelu_linear(a, lin) = lin(gelu_tanh(a)); swiglu_linear(x12, lin) = lin(swiglu(x12))
    gelu_linear: Callable
    swiglu_linear: Callable


# ------------------------------------------------------------------ the reference ops
# Plain PyTorch, exactly the original implementation's math, and the one definition of each op's
# reference: the kernels in kernels/ import their `*_ref` from here (beside each kernel). Defined
# here so that the reference path imports neither Triton nor the kernels (a machine without them,
# or without flowtok_fast.kernels installed, still runs every model on the reference ops).


def ln_modulate_ref(x, shift, scale, eps: float = 1e-6, out_dtype: torch.dtype | None = None):
    out = F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return out if out_dtype is None else out.to(out_dtype)


def gated_residual_ref(x, y, gate):
    return x + gate.unsqueeze(1) * y


def gated_residual_ln_modulate_ref(x, y, gate, shift, scale, eps: float = 1e-6, out_dtype: torch.dtype | None = None):
    res = gated_residual_ref(x, y, gate)
    return res, ln_modulate_ref(res, shift, scale, eps, out_dtype)


def swiglu_ref(x12):
    x1, x2 = x12.chunk(2, dim=-1)
    return F.silu(x1) * x2


def gelu_tanh_ref(x, bias=None, *, out_dtype: torch.dtype | None = None):
    out = F.gelu(x if bias is None else x + bias, approximate="tanh")
    return out if out_dtype is None else out.to(out_dtype)


def cfg_euler_step_ref(x, v, dt, scale):
    """In place: x += dt * (v_u + scale * (v_c - v_u)) with v = [v_c; v_u]; returns x."""
    b = x.shape[0]
    v = v.float()
    v_c, v_u = v[:b], v[b:]
    return x.copy_(x.float() + dt * (v_u + scale * (v_c - v_u)))


def euler_step_ref(x, v, dt):
    return x.copy_(x.float() + dt * v.float())


def apply_rope_ref(x, cos, sin):
    """Rotate adjacent channel pairs of x [..., R, hd]: x * cos + rotate_half(x) * sin with
    rotate_half(x)[2k] = -x[2k+1], rotate_half(x)[2k+1] = x[2k]. Math in fp32 (fp64 stays fp64),
    result in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return (xf * cos.to(dtype) + rotated * sin.to(dtype)).to(x.dtype)


def attention_ref(qkv, rope_cos=None, rope_sin=None):
    """qkv [B,N,3,H,hd] -> [B,N,H*hd]: RoPE on q and k of the first R tokens, then SDPA with the
    default scale hd**-0.5 (the models' CPU path)."""
    b, n, _, h, hd = qkv.shape
    q, k, v = qkv.transpose(1, 3).unbind(2)  # each [B, H, N, hd], strided views
    if rope_cos is not None:
        r = rope_cos.shape[0]

        def rope(t):
            if r == n:
                return apply_rope_ref(t, rope_cos, rope_sin)
            return torch.cat((apply_rope_ref(t[..., :r, :], rope_cos, rope_sin), t[..., r:, :]), dim=-2)

        q, k = rope(q), rope(k)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * hd)


def modulated_linear_ref(x, shift, scale, lin: nn.Linear):
    return lin(ln_modulate_ref(x, shift, scale))


def gated_residual_modulated_linear_ref(x, y, gate, shift, scale, lin: nn.Linear):
    res, h = gated_residual_ln_modulate_ref(x, y, gate, shift, scale)
    return res, lin(h)


def gelu_linear_ref(a, lin: nn.Linear):
    return lin(gelu_tanh_ref(a))


def swiglu_linear_ref(x12, lin: nn.Linear):
    return lin(swiglu_ref(x12))


def _build(impl: str) -> Ops:
    if impl == "reference":
        return Ops(
            name="reference",
            attention=attention_ref,
            swiglu=swiglu_ref,
            gelu_tanh=gelu_tanh_ref,
            ln_modulate=ln_modulate_ref,
            gated_residual=gated_residual_ref,
            gated_residual_ln_modulate=gated_residual_ln_modulate_ref,
            cfg_euler_step_=cfg_euler_step_ref,
            euler_step_=euler_step_ref,
            modulated_linear=modulated_linear_ref,
            gated_residual_modulated_linear=gated_residual_modulated_linear_ref,
            gelu_linear=gelu_linear_ref,
            swiglu_linear=swiglu_linear_ref,
        )
    # only now: importing the kernels imports Triton, and @triton.jit chooses compiler or
    # interpreter (TRITON_INTERPRET) when the kernel modules are first imported
    from flowtok_fast.kernels import adaln, attention, flow_step, fused_linear, swiglu

    return Ops(
        name="triton",
        attention=attention.attention,
        swiglu=swiglu.swiglu,
        gelu_tanh=swiglu.gelu_tanh,
        ln_modulate=adaln.ln_modulate,
        gated_residual=adaln.gated_residual,
        gated_residual_ln_modulate=adaln.gated_residual_ln_modulate,
        cfg_euler_step_=flow_step.cfg_euler_step_,
        euler_step_=flow_step.euler_step_,
        modulated_linear=fused_linear.modulated_linear,
        gated_residual_modulated_linear=fused_linear.gated_residual_modulated_linear,
        gelu_linear=fused_linear.gelu_linear,
        swiglu_linear=fused_linear.swiglu_linear,
    )


_CACHE: dict[str, Ops] = {}


def get_ops(impl: str = "reference") -> Ops:
    if impl not in IMPLS:
        raise UserError(f"unknown ops implementation '{impl}': expected one of {IMPLS}")
    if impl not in _CACHE:
        _CACHE[impl] = _build(impl)
    return _CACHE[impl]


class UsesOps:
    """Mixin for modules that call the ops layer; `self.ops` defaults to the reference ops."""

    @property
    def ops(self) -> Ops:
        return self.__dict__.get("_ops") or get_ops("reference")

    @ops.setter
    def ops(self, value: Ops) -> None:
        self.__dict__["_ops"] = value


def use(model: nn.Module, impl: str) -> nn.Module:
    """Select the implementation of every op called inside `model` (in place; returns model).

    The Triton kernels run on CUDA tensors; on CPU only under TRITON_INTERPRET=1 (tests). The
    kernels check their inputs' device at call time and raise if they cannot run there.
    """
    ops = get_ops(impl)
    for m in model.modules():
        if isinstance(m, UsesOps):
            m.ops = ops
    return model


def impl_of(model: nn.Module) -> str:
    names = {m.ops.name for m in model.modules() if isinstance(m, UsesOps)}
    return names.pop() if len(names) == 1 else ("mixed" if names else "none")
