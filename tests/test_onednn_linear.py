"""fp32 CPU linears on oneDNN (flowtok_fast/onednn_linear.py), the compiled samplers' fp32 GEMMs:
as accurate as torch's own fp32 linear (MKL) against fp64, at the brief's odd sizes; only fp32 CPU
linears outside autocast are rerouted."""
import pytest
import torch
import torch.nn.functional as F

from flowtok_fast import onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch has no oneDNN (mkldnn)")


def _ran(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("batch,tokens,width,out", [(1, 77, 1152, 2730), (3, 410, 96, 77), (3, 77, 768, 1152)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64_as_closely_as_torch_fp32(batch, tokens, width, out, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=g)
    w = torch.randn(out, width, generator=g) / width**0.5
    b = torch.randn(out, generator=g) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())

    def rms(y):
        return (y.double() - exact).pow(2).mean().sqrt().item()

    torch_err = rms(F.linear(x, w, b))
    with onednn_linear.linears(), torch.no_grad():
        got = F.linear(x, w, b)
    assert got.shape == exact.shape and got.dtype == torch.float32
    # "about twice" torch's own fp32 error: measured 1.0x (K=96), 1.45x (K=768), 2.1x (K >= 1152;
    # oneDNN sums K in longer runs than MKL); both ~5e-7 RMS on outputs of order 1
    assert rms(got) <= 2.5 * torch_err, (rms(got), torch_err)


def test_routes_only_fp32_cpu_linears_outside_autocast():
    x, w, b = torch.randn(2, 5, 16), torch.randn(8, 16), torch.randn(8)
    with onednn_linear.linears():
        assert "flowtok::onednn_linear" not in _ran(lambda: F.linear(x, w, b))  # grad mode: no backward here
    with onednn_linear.linears(), torch.no_grad():
        assert "flowtok::onednn_linear" in _ran(lambda: F.linear(x, w, b))
        assert "flowtok::onednn_linear" in _ran(lambda: F.linear(x, weight=w, bias=b))
        assert "flowtok::onednn_linear" in _ran(lambda: torch.nn.Linear(16, 8)(x))  # modules call F.linear
        assert "flowtok::onednn_linear" not in _ran(lambda: F.linear(x.double(), w.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "flowtok::onednn_linear" not in _ran(lambda: F.linear(x, w, b))
            assert F.linear(x, w, b).dtype == torch.bfloat16  # autocast's linear, as without the context
    with torch.no_grad():
        assert "flowtok::onednn_linear" not in _ran(lambda: F.linear(x, w, b))  # only inside the context
