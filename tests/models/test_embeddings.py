"""Fixed tables against direct formulas: 2-D RoPE, position sin-cos, timestep features."""
import math

import torch

from flowtok_fast.models.embeddings import sincos_1d, timestep_features
from flowtok_fast.models.rope import rope_2d_tables


def test_rope_2d_is_complex_multiplication_on_row_col():
    from flowtok_fast.kernels.attention import apply_rope_ref

    g, hd = 5, 64
    cos, sin = rope_2d_tables(g, hd)
    x = torch.randn(2, 3, g * g, hd, dtype=torch.float64)
    out = apply_rope_ref(x, cos.double(), sin.double())
    # complex view: channel pairs (2k, 2k+1) -> x[2k] + i x[2k+1]
    z = torch.view_as_complex(x.reshape(2, 3, g * g, hd // 2, 2).contiguous())
    k = torch.arange(16, dtype=torch.float64)
    freqs = 10000.0 ** (-2 * k / 32)  # 16 frequencies per half
    p = torch.arange(g * g)
    row, col = (p // g).double(), (p % g).double()
    angle = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=1)  # [g*g, 32 pairs]
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(2, 3, g * g, hd)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rope_tables_layout():
    cos, sin = rope_2d_tables(16, 64)
    assert cos.shape == (256, 64) and cos.dtype == torch.float32
    # token (row 3, col 7): channel 2 uses row * f_1, channel 34 uses col * f_1; pairs share angles
    f1 = 10000.0 ** (-2 / 32)
    p = 3 * 16 + 7
    assert math.isclose(cos[p, 2].item(), math.cos(3 * f1), abs_tol=1e-6)
    assert math.isclose(sin[p, 3].item(), math.sin(3 * f1), abs_tol=1e-6)
    assert math.isclose(cos[p, 34].item(), math.cos(7 * f1), abs_tol=1e-6)


def test_sincos_position_embedding_formula():
    d = 10
    emb = sincos_1d(77, d)
    assert emb.shape == (77, d) and emb.dtype == torch.float32
    for pos in (0, 1, 76):
        for i in range(d // 2):
            w = 1.0 / 10000 ** (i / (d / 2))
            assert math.isclose(emb[pos, i].item(), math.sin(pos * w), abs_tol=1e-6)  # sin first
            assert math.isclose(emb[pos, d // 2 + i].item(), math.cos(pos * w), abs_tol=1e-6)


def test_timestep_features_formula():
    t = torch.tensor([0.0, 0.37, 1.0])
    f = timestep_features(t, 256)
    assert f.shape == (3, 256)
    for b in range(3):
        for i in (0, 5, 127):
            freq = math.exp(-math.log(10000) * i / 128)
            assert math.isclose(f[b, i].item(), math.cos(t[b].item() * freq), abs_tol=1e-6)  # cos first
            assert math.isclose(f[b, 128 + i].item(), math.sin(t[b].item() * freq), abs_tol=1e-6)
