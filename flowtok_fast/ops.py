"""THE ops layer: every fusable op the models call, with an explicit implementation choice.

`"reference"` is plain PyTorch (the `*_ref` functions beside each kernel, exactly the original
implementation's math); `"triton"` is the fused kernels in `flowtok_fast.kernels`. Asking for
an implementation that cannot run is an error, never a silent fallback.

Models never import kernels: each module that calls an op holds an `ops` attribute (an `Ops`
namespace) and `use(model, impl)` swaps it from outside, so kernel choice is applied around
the model, not woven into it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

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


def _build(impl: str) -> Ops:
    from flowtok_fast.kernels import adaln, attention, flow_step, fused_linear, swiglu

    if impl == "reference":
        return Ops(
            name="reference",
            attention=attention.attention_ref,
            swiglu=swiglu.swiglu_ref,
            gelu_tanh=swiglu.gelu_tanh_ref,
            ln_modulate=adaln.ln_modulate_ref,
            gated_residual=adaln.gated_residual_ref,
            gated_residual_ln_modulate=adaln.gated_residual_ln_modulate_ref,
            cfg_euler_step_=flow_step.cfg_euler_step_ref,
            euler_step_=flow_step.euler_step_ref,
            modulated_linear=fused_linear.modulated_linear_ref,
            gated_residual_modulated_linear=fused_linear.gated_residual_modulated_linear_ref,
            gelu_linear=fused_linear.gelu_linear_ref,
            swiglu_linear=fused_linear.swiglu_linear_ref,
        )
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
        raise ValueError(f"unknown ops implementation '{impl}': expected one of {IMPLS}")
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
