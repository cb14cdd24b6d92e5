"""Fused RoPE + flash attention (kernels/attention.py) against its PyTorch reference.

Error rule (flash-attention style): the kernel's error against an fp64 reference must stay
within 2x the error of the same-precision PyTorch reference plus a small atol. Inputs are fresh
each run; the seed is in every failure message. Outputs are NaN-poisoned so an unwritten
element fails. Runs in the Triton interpreter on CPU (tests/conftest.py sets it up).
"""
import math
import os

import pytest
import torch

import triton
import triton.language as tl

from flowtok_fast.kernels import attention as attention_module
from flowtok_fast.kernels.attention import attention, attention_fwd, attention_ref, apply_rope_ref
from .shapes import real
from .utils import assert_within_ref_error, poisoned_outputs


def _seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def _qkv(B, N, H, hd, dtype):
    # q and k scaled up so the softmax is peaked and the online max really moves between blocks.
    x = torch.randn(B, N, 3, H, hd)
    x[:, :, :2] *= 2.0
    return x.to(dtype)


def _random_tables(R, hd):
    """Unstructured tables (sin not repeated within a pair): checks the rotation and its
    transpose in general, not just for the EVA layout."""
    angles = torch.rand(R, hd) * 2 * math.pi
    return angles.cos(), angles.sin()


def _rope_2d_tables(g, hd):
    """The tokenizer's 2-D RoPE (REFERENCE.md 5): hd/4 frequencies 10000^(-2j/(hd/2)), each
    repeated for a channel pair; first half of the channels by row, second half by column."""
    quarter = hd // 4
    freqs = 10000.0 ** (-2.0 * torch.arange(quarter, dtype=torch.float64) / (hd // 2))
    freqs = freqs.repeat_interleave(2)  # [hd/2], pair-interleaved
    pos = torch.arange(g * g)
    row, col = (pos // g).double(), (pos % g).double()
    angles = torch.cat((row[:, None] * freqs, col[:, None] * freqs), dim=1)  # [g*g, hd]
    return angles.cos().float(), angles.sin().float()


def _tables(R, hd, kind):
    if R == 0:
        return None, None
    if kind == "2d":
        g = math.isqrt(R)
        assert g * g == R
        return _rope_2d_tables(g, hd)
    return _random_tables(R, hd)


def _lse_ref(qkv, cos, sin):
    """logsumexp of the scaled scores, [B, H, N], in fp64 from q and k rotated in qkv's dtype:
    for fp64 qkv the exact value; for 16-bit qkv the rotated q and k are rounded to that dtype
    as the same-precision reference (and the kernel's 16-bit dots) round them."""
    q, k, _ = qkv.transpose(1, 3).unbind(2)
    if cos is not None:
        R = cos.shape[0]
        q = torch.cat((apply_rope_ref(q[..., :R, :], cos, sin), q[..., R:, :]), dim=-2)
        k = torch.cat((apply_rope_ref(k[..., :R, :], cos, sin), k[..., R:, :]), dim=-2)
    q, k = q.double(), k.double()
    return torch.logsumexp(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


# (B, N, H, hd, R, tables): generator lengths 77 / 154 (hd 64 and the XL's 72, padded to 128),
# RoPE prefixes that end mid-block, and the 256-px decoder layout (410 tokens, g = 16).
FWD_CASES = [
    (1, 77, 2, 64, 0, None),
    (3, 77, 2, 72, 16, "random"),
    (1, 154, 2, 72, 0, None),
    (2, 154, 1, 64, 100, "random"),
    (1, 410, 2, 64, 256, "2d"),
] + real([  # generator XL (hd 72) and H (hd 64) at 77 tokens; decoder layout at 410, both hds
    (8, 77, 16, 72, 0, None), (8, 77, 20, 64, 0, None),
    (2, 410, 16, 64, 256, "2d"), (2, 410, 16, 72, 256, "2d"),
])


def _case_id(case):
    B, N, H, hd, R, kind = case
    return f"B{B}-N{N}-H{H}-hd{hd}-R{R}" + (f"-{kind}" if kind else "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_forward(case, dtype):
    B, N, H, hd, R, kind = case
    seed = _seed()
    qkv = _qkv(B, N, H, hd, dtype)
    cos, sin = _tables(R, hd, kind)
    with poisoned_outputs():
        out, lse = attention_fwd(qkv, cos, sin)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_exact = attention_ref(qkv.double(), cos, sin)
    ref_same = attention_ref(qkv, cos, sin)
    assert_within_ref_error(out, ref_same, ref_exact, name=f"out (seed {seed})")
    # The logsumexp: fp32 arithmetic on the (rotated, rounded) dot operands; judged by the same
    # rule against the fp64 value from the same rounded operands and the exact one (atol: a
    # GPU's approximate exp2 / log2 are good to ~2 ulp).
    assert_within_ref_error(lse, _lse_ref(qkv, cos, sin), _lse_ref(qkv.double(), cos, sin),
                            atol=1e-5, name=f"lse (seed {seed})")


def _grads(fn, qkv, dout, cos, sin):
    leaf = qkv.detach().clone().requires_grad_()
    out = fn(leaf, cos, sin)
    (grad,) = torch.autograd.grad(out, leaf, dout.to(out.dtype))
    return out, grad


# Backward at the awkward shapes; the N = 410 decoder case is the big one (bf16 only).
BWD_CASES = [
    (1, 77, 2, 64, 0, None, torch.float32),
    (3, 77, 2, 72, 16, "random", torch.float32),
    (1, 77, 2, 72, 16, "random", torch.bfloat16),
    (1, 154, 2, 64, 0, None, torch.bfloat16),
    (2, 154, 1, 72, 100, "random", torch.float32),
    # The big one (~10 s in the interpreter): deselect with -k "not big".
    pytest.param((1, 410, 2, 64, 256, "2d", torch.bfloat16), id="B1-N410-H2-hd64-R256-2d-bf16-big"),
] + real([(*case, dtype) for case in FWD_CASES[-4:] for dtype in (torch.float32, torch.bfloat16)])


@pytest.mark.parametrize("case", BWD_CASES,
                         ids=lambda c: _case_id(c[:6]) + ("-fp32" if c[6] == torch.float32 else "-bf16"))
def test_backward(case):
    B, N, H, hd, R, kind, dtype = case
    seed = _seed()
    qkv = _qkv(B, N, H, hd, dtype)
    cos, sin = _tables(R, hd, kind)
    dout = torch.randn(B, N, H * hd)
    with poisoned_outputs():
        out, grad = _grads(attention, qkv, dout, cos, sin)
    _, grad_exact = _grads(attention_ref, qkv.double(), dout, cos, sin)
    _, grad_same = _grads(attention_ref, qkv, dout, cos, sin)
    assert grad.shape == qkv.shape and grad.dtype == dtype
    # Judge q, k and v separately: each has its own scale.
    for i, name in enumerate("qkv"):
        assert_within_ref_error(grad[:, :, i], grad_same[:, :, i], grad_exact[:, :, i],
                                name=f"d{name} (seed {seed})")


def test_fp16_forward_backward():
    seed = _seed()
    qkv = _qkv(2, 77, 1, 64, torch.float16)
    cos, sin = _random_tables(30, 64)
    dout = torch.randn(2, 77, 64)
    with poisoned_outputs():
        out, grad = _grads(attention, qkv, dout, cos, sin)
    out_exact, grad_exact = _grads(attention_ref, qkv.double(), dout, cos, sin)
    out_same, grad_same = _grads(attention_ref, qkv, dout, cos, sin)
    assert_within_ref_error(out, out_same, out_exact, name=f"out (seed {seed})")
    assert_within_ref_error(grad, grad_same, grad_exact, name=f"dqkv (seed {seed})")


# The GPU's launch parameters in the interpreter: 64-wide tiles, the dk/dv kernel's 32-query
# steps, and 16-bit dot operands (q, k, v, dO, P and dS rounded to bf16 before each product,
# emulated here with fp32 products of the rounded values). num_stages = 2 only pipelines loads;
# it does not change the arithmetic. Awkward shapes: 77 and 410 tokens, hd 72 (padded to 128)
# and 64, batch 3 and 1, a RoPE prefix of 256 tokens.
GPU_LAUNCH_CASES = [(3, 77, 1, 72, 0, None), (1, 410, 1, 64, 256, "2d")]


@pytest.mark.parametrize("case", GPU_LAUNCH_CASES, ids=_case_id)
def test_gpu_launch_parameters_bf16(case, monkeypatch):
    monkeypatch.setattr(attention_module, "GPU_LAUNCH_IN_INTERPRETER", True)
    B, N, H, hd, R, kind = case
    params = attention_module._launch_params(hd, torch.bfloat16, R > 0, True, gpu=True)
    assert params["fwd"][0]["BLOCK_M"] == 64 and params["fwd"][0]["DOT_LOWP"]
    assert params["fwd"][1]["num_stages"] == 2 and params["dkdv"][0]["BLOCK_M"] == 32
    seed = _seed()
    qkv = _qkv(B, N, H, hd, torch.bfloat16)
    cos, sin = _tables(R, hd, kind)
    dout = torch.randn(B, N, H * hd)
    leaf = qkv.clone().requires_grad_()
    with poisoned_outputs():
        out, lse = attention_fwd(leaf, cos, sin)
        (grad,) = torch.autograd.grad(out, leaf, dout.to(out.dtype))
    out_exact, grad_exact = _grads(attention_ref, qkv.double(), dout, cos, sin)
    out_same, grad_same = _grads(attention_ref, qkv, dout, cos, sin)
    assert_within_ref_error(out, out_same, out_exact, name=f"out (seed {seed})")
    assert_within_ref_error(lse, _lse_ref(qkv, cos, sin), _lse_ref(qkv.double(), cos, sin),
                            atol=1e-5, name=f"lse (seed {seed})")
    for i, name in enumerate("qkv"):
        assert_within_ref_error(grad[:, :, i], grad_same[:, :, i], grad_exact[:, :, i],
                                name=f"d{name} (seed {seed})")


@triton.jit
def _dot_operand_kernel(X, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(OUT + offs, attention_module._dot_operand(x, tl.bfloat16).to(tl.float32))


def test_dot_operands_are_rounded_to_bf16_to_nearest():
    # What the bf16 tests above rely on: the interpreter path really rounds the dot operands
    # (to nearest, ties to even, as a GPU's cvt.rn.bf16), it does not pass fp32 through.
    x = torch.randn(1024) * 10.0
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20])  # ties
    out = torch.full_like(x, float("nan"))
    _dot_operand_kernel[(1,)](x, out, N=1024)
    want = x.to(torch.bfloat16).float()  # torch rounds to nearest even
    assert not torch.equal(want, x), "the inputs need bits below bf16 precision"
    assert torch.equal(out, want)


def test_bf16_stores_round_to_nearest():
    # A truncating fp32 -> bf16 cast (the interpreter's default) pulls every value towards zero
    # and can hide inside the 2x error budget; rounding to nearest leaves no bias.
    seed = _seed()
    qkv = _qkv(1, 77, 2, 64, torch.bfloat16)
    cos, sin = _random_tables(16, 64)
    dout = torch.randn(1, 77, 128)
    with poisoned_outputs():
        out, grad = _grads(attention, qkv, dout, cos, sin)
    out_exact, grad_exact = _grads(attention_ref, qkv.double(), dout, cos, sin)
    for name, x, exact in (("out", out, out_exact), ("dqkv", grad, grad_exact)):
        err = x.double() - exact
        bias = (err * exact.sign()).mean() / err.abs().mean()
        assert abs(bias) < 0.3, f"{name}: bf16 rounding bias {bias:.2f} (seed {seed})"


# numpy warns about the exp overflows the kernels compute and then mask (or never store: the
# padded key rows of the dk / dv tiles); the results are checked below.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_very_negative_scores():
    # Every score near -100: the logsumexp is far below 0, so exp(score - lse) of a padded key
    # (score 0) would overflow to inf; the kernels must mask those keys, not rely on k = 0.
    seed = _seed()
    qkv = 0.3 * torch.randn(1, 77, 3, 1, 64)
    qkv[:, :, 0] -= 3.0
    qkv[:, :, 1] += 4.0  # q . k / 8 ~ -96
    dout = torch.randn(1, 77, 64)
    with poisoned_outputs():
        out, grad = _grads(attention, qkv, dout, None, None)
    out_exact, grad_exact = _grads(attention_ref, qkv.double(), dout, None, None)
    out_same, grad_same = _grads(attention_ref, qkv, dout, None, None)
    assert_within_ref_error(out, out_same, out_exact, name=f"out (seed {seed})")
    assert_within_ref_error(grad, grad_same, grad_exact, name=f"dqkv (seed {seed})")


def test_rope_tables_change_the_result():
    # Guards the tests above against a kernel that ignores the tables: with RoPE the result
    # must follow attention_ref *with* the tables and differ from plain attention.
    seed = _seed()
    qkv = _qkv(1, 77, 1, 64, torch.float32)
    cos, sin = _rope_2d_tables(8, 64)  # R = 64 of 77 tokens
    with poisoned_outputs():
        out = attention(qkv, cos, sin)
    ref = attention_ref(qkv.double(), cos, sin)
    plain = attention_ref(qkv.double())
    assert (out.double() - ref).abs().max() < 1e-4, f"seed {seed}"
    assert (plain - ref).abs().max() > 1e-2, f"seed {seed}"


def test_rope_on_every_token():
    # R == N: the whole sequence is rotated (no unrotated tail).
    seed = _seed()
    qkv = _qkv(1, 49, 2, 64, torch.float32)
    cos, sin = _rope_2d_tables(7, 64)
    dout = torch.randn(1, 49, 128)
    with poisoned_outputs():
        out, grad = _grads(attention, qkv, dout, cos, sin)
    out_exact, grad_exact = _grads(attention_ref, qkv.double(), dout, cos, sin)
    out_same, grad_same = _grads(attention_ref, qkv, dout, cos, sin)
    assert_within_ref_error(out, out_same, out_exact, name=f"out (seed {seed})")
    assert_within_ref_error(grad, grad_same, grad_exact, name=f"dqkv (seed {seed})")


def test_strided_qkv():
    # Views the kernels read in place (every other token, a batch slice) and one they must copy
    # (channels padded, so heads are not packed).
    seed = _seed()
    base = _qkv(3, 2 * 45, 2, 64, torch.float32)
    padded = torch.randn(2, 45, 3, 2, 72)[..., :64]
    for name, qkv in (("token stride", base[:, ::2]), ("batch slice", base[1:, :45]),
                      ("padded channels", padded)):
        cos, sin = _random_tables(20, 64)
        with poisoned_outputs():
            out = attention(qkv, cos, sin)
        assert_within_ref_error(out, attention_ref(qkv, cos, sin), attention_ref(qkv.double(), cos, sin),
                                name=f"{name} (seed {seed})")


def test_alignment_hint_only_when_true():
    # The GPU kernels promise the compiler 16-byte aligned rows when _rows_aligned says so; the
    # interpreter ignores the hint, so a wrong True would only show on a GPU. Check it here.
    from flowtok_fast.kernels.attention import _rows_aligned

    qkv = torch.empty(2, 77, 3, 16, 72, dtype=torch.bfloat16)
    tables = torch.empty(64, 72)
    assert _rows_aligned(72, qkv, tables)
    assert _rows_aligned(64, torch.empty(2, 410, 3, 16, 64, dtype=torch.bfloat16)[:, ::2])
    flat = torch.empty(2 * 77 * 3 * 16 * 72 + 1, dtype=torch.bfloat16)
    assert not _rows_aligned(72, flat[1:].view(2, 77, 3, 16, 72))        # base pointer off by 2 bytes
    assert not _rows_aligned(4, torch.empty(2, 77, 3, 16, 4, dtype=torch.bfloat16))  # 8-byte heads
    assert not _rows_aligned(64, torch.empty(2, 77, 3 * 16 * 64 + 1, dtype=torch.bfloat16)[..., :-1]
                             .view(2, 77, 3, 16, 64))                       # odd token stride


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    seed = _seed()
    qkv = _qkv(2, 40, 2, 64, torch.float32)
    cos, sin = _random_tables(12, 64)
    weight = torch.randn(40, 128)

    def loss_fn(x):
        return (attention(x, cos, sin) * weight).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x_c = qkv.clone().requires_grad_()
    x_e = qkv.clone().requires_grad_()
    with poisoned_outputs():
        loss_c = compiled(x_c)
        loss_c.backward()
        loss_e = loss_fn(x_e)
        loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-6), f"seed {seed}"
    assert torch.isfinite(x_c.grad).all() and torch.allclose(x_c.grad, x_e.grad, rtol=1e-6, atol=1e-6), (
        f"seed {seed}")
    # And both agree with the reference.
    x_r = qkv.double().requires_grad_()
    (attention_ref(x_r, cos, sin) * weight.double()).sum().backward()
    assert (x_c.grad.double() - x_r.grad).abs().max() < 1e-4, f"seed {seed}"


def test_fake_and_meta_shapes():
    qkv = torch.empty(2, 410, 3, 16, 64, device="meta", dtype=torch.bfloat16)
    cos = torch.empty(256, 64, device="meta")
    out, lse = attention_fwd(qkv, cos, cos)
    assert out.shape == (2, 410, 1024) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert lse.shape == (2, 16, 410) and lse.dtype == torch.float32
    grad = torch.ops.flowtok.attention_bwd(out, qkv, out, lse, cos, cos)
    assert grad.shape == qkv.shape and grad.dtype == qkv.dtype


# opcheck of both attention ops: tests/kernels/test_opcheck.py


@pytest.mark.parametrize("fn", [attention, attention_ref], ids=["kernel", "ref"])
def test_bad_inputs_raise(fn):
    good = torch.randn(1, 10, 3, 2, 8)
    cos, sin = _random_tables(4, 8)
    bad_calls = [
        ((torch.randn(10, 3, 2, 8),), "5-D"),                    # missing batch axis
        ((torch.randn(1, 10, 2, 2, 8),), "5-D"),                 # not [q | k | v]
        ((good.to(torch.int32),), "dtype"),
        ((good, cos, None), "both"),
        ((good, cos[:, :6], sin[:, :6]), "[R, hd]"),              # table width != hd
        ((good, torch.ones(11, 8), torch.ones(11, 8)), "R <= N"),  # more rows than tokens
        ((good, cos.to(torch.int64), sin.to(torch.int64)), "float"),
        ((good, cos.to("meta"), sin.to("meta")), "device"),
    ]
    for args, expected in bad_calls:
        with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            fn(*args)


def test_kernel_rejects_float64():
    with pytest.raises(ValueError, match="dtype"):
        attention(torch.randn(1, 10, 3, 2, 8, dtype=torch.float64))


def test_cpu_without_interpreter_raises(monkeypatch):
    # Explicitly on the CPU: on a GPU machine the kernel tests' default device is CUDA.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(got cpu\)"):
        attention(torch.randn(1, 10, 3, 2, 8, device="cpu"))
