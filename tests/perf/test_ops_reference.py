"""The reference ops live in flowtok_fast/ops.py without Triton: same math as the kernels' `*_ref`
(bitwise), and the reference path imports neither Triton nor flowtok_fast.kernels."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from flowtok_fast import ops
from flowtok_fast.kernels import adaln, attention, flow_step, fused_linear, swiglu


def _cases():
    b, n, d, h, hd = 2, 12, 24, 2, 8
    x, y = torch.randn(b, n, d), torch.randn(b, n, d)
    gate, shift, scale = torch.randn(b, d), torch.randn(b, d), torch.randn(b, d)
    lin = nn.Linear(d, 5)
    qkv = torch.randn(b, n, 3, h, hd)
    cos, sin = torch.randn(n - 3, hd), torch.randn(n - 3, hd)
    x12 = torch.randn(b, n, 2 * d)
    xs, v = torch.randn(b, 77, 16), torch.randn(2 * b, 77, 16, dtype=torch.bfloat16)
    return [
        ("ln_modulate", adaln.ln_modulate_ref, (x, shift, scale)),
        ("gated_residual", adaln.gated_residual_ref, (x, y, gate)),
        ("gated_residual_ln_modulate", adaln.gated_residual_ln_modulate_ref, (x, y, gate, shift, scale)),
        ("swiglu", swiglu.swiglu_ref, (x12,)),
        ("gelu_tanh", swiglu.gelu_tanh_ref, (x,)),
        ("attention", attention.attention_ref, (qkv,)),
        ("attention", attention.attention_ref, (qkv, cos, sin)),  # RoPE on the first R < N tokens
        ("attention", attention.attention_ref, (qkv.bfloat16(), cos[:1].expand(n, hd), sin[:1].expand(n, hd))),
        ("cfg_euler_step_", flow_step.cfg_euler_step_ref, (xs, v, 0.05, 2.0)),
        ("euler_step_", flow_step.euler_step_ref, (xs, v[:b], torch.tensor(0.05))),
        ("modulated_linear", fused_linear.modulated_linear_ref, (x, shift, scale, lin)),
        ("gated_residual_modulated_linear", fused_linear.gated_residual_modulated_linear_ref,
         (x, y, gate, shift, scale, lin)),
        ("gelu_linear", fused_linear.gelu_linear_ref, (x, lin)),
        ("swiglu_linear", fused_linear.swiglu_linear_ref, (torch.randn(b, n, 10), nn.Linear(5, 3))),
    ]


@pytest.mark.parametrize("i", range(14))
def test_reference_ops_equal_the_kernels_references(i):
    name, kernel_ref, args = _cases()[i]
    ours = getattr(ops.get_ops("reference"), name)
    clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a  # noqa: E731 (in-place ops)
    torch.testing.assert_close(ours(*map(clone, args)), kernel_ref(*map(clone, args)), rtol=0, atol=0)


def test_reference_path_imports_no_kernels():
    code = ("import sys; from flowtok_fast import ops; from flowtok_fast.configs import TINY; "
            "from flowtok_fast.models.generator import FlowTokGenerator; import torch; "
            "g = ops.use(FlowTokGenerator(TINY.generator, TINY.text_vae), 'reference'); "
            "g(torch.randn(1, 77, 16), torch.rand(1), torch.zeros(1, dtype=torch.long)); "
            "bad = [m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'flowtok_fast.kernels'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
