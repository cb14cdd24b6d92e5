"""The static-shape sampler equals the eager `flow.sample`, without host synchronisation.

CPU: the eager static loop (bitwise), the bf16 pre-cast weights (bitwise against autocast), the
Inductor-compiled forward (to rounding), frozen on CPU (a weight snapshot, fp32 and bf16). CUDA (skipped without a GPU): one CUDA graph for the
whole loop, torch.compile reduce-overhead, the Triton step kernel, and no host sync under
torch.cuda.set_sync_debug_mode("error").
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowtok_fast import flow, ops
from flowtok_fast.configs import TINY
from flowtok_fast.fast_sampler import FastSampler
from flowtok_fast.models.generator import FlowTokGenerator

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _generator(device="cpu"):
    torch.manual_seed(0)
    g = FlowTokGenerator(TINY.generator, TINY.text_vae).eval().requires_grad_(False)
    with torch.no_grad():  # DiT zero-inits adaLN and the output: make the model input-dependent
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return g.to(device)


@pytest.fixture(scope="module")
def generator():
    return _generator()


@pytest.mark.parametrize("cfg_scale, grid", [(2.0, "reference"), (1.0, "consistent")])
def test_eager_static_loop_equals_flow_sample(generator, cfg_scale, grid):
    x0 = torch.randn(2, 77, 16)
    ref = flow.sample(generator, x0, steps=4, cfg_scale=cfg_scale, grid=grid)
    sampler = FastSampler(generator, 2, steps=4, cfg_scale=cfg_scale, grid=grid, mode="eager")
    torch.testing.assert_close(sampler(x0), ref, rtol=0, atol=0)
    torch.testing.assert_close(sampler(x0), ref, rtol=0, atol=0)  # reusable: state is reset per call


def test_precast_bf16_weights_equal_autocast(generator):
    x0 = torch.randn(2, 77, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = flow.sample(generator, x0, steps=3, cfg_scale=2.0)
    sampler = FastSampler(generator, 2, steps=3, cfg_scale=2.0, mode="eager", dtype=torch.bfloat16)
    torch.testing.assert_close(sampler(x0), ref, rtol=0, atol=0)


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that copies a device value to the host or has a data-dependent shape."""

    BANNED = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.BANNED:
            raise AssertionError(f"host synchronisation in the sampler loop: {func}")
        return func(*args, **(kwargs or {}))


def test_loop_has_no_host_sync(generator):
    sampler = FastSampler(generator, 2, steps=3, cfg_scale=2.0, mode="eager")
    sampler.x.normal_()
    with torch.no_grad(), _NoHostSync():
        sampler._loop()
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        torch.ones(1).item()  # the guard itself works


def test_compiled_forward_matches(generator):
    x0 = torch.randn(2, 77, 16)
    ref = flow.sample(generator, x0, steps=2, cfg_scale=2.0)
    sampler = FastSampler(generator, 2, steps=2, cfg_scale=2.0, mode="compile")
    torch.testing.assert_close(sampler(x0), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_compile_freezes_the_weights(dtype, tol):
    """mode=compile on a CPU freezes: the output equals eager in the same dtype. In bf16 the frozen
    linear weights are bf16 copies made once, at the first call (folded casts, oneDNN prepacking): a
    snapshot, where an unfrozen compiled forward reads the weights as they are now. (fp32 weights,
    and the norms in bf16, are frozen as the module's own tensors: no snapshot to see there.)"""
    g = _generator()
    x0 = torch.randn(2, 77, 16)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        ref = flow.sample(g, x0, steps=2, cfg_scale=2.0)
    frozen = FastSampler(g, 2, steps=2, cfg_scale=2.0, mode="compile", dtype=dtype)
    assert frozen.freeze and frozen.params is None  # autocast's casts are folded by Inductor
    torch.testing.assert_close(frozen(x0), ref, rtol=tol, atol=tol)
    if dtype == torch.float32:
        return
    with torch.no_grad():  # the matmul weights: the ones autocast casts and freezing folds
        for m in g.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(1.5)
    torch.testing.assert_close(frozen(x0), ref, rtol=tol, atol=tol)  # still the weights it froze
    unfrozen = FastSampler(g, 2, steps=2, cfg_scale=2.0, mode="compile", dtype=dtype, freeze=False)
    assert (unfrozen(x0) - ref).abs().max() > 10 * tol  # the changed weights: the snapshot is real


def test_cpu_compiled_decoder_matches_eager():
    from flowtok_fast import fast_sampler
    from tests.conftest import flowing_tiny

    tok = flowing_tiny(0).tokenizer
    lat, feats = torch.randn(2, 77, 16), torch.randn(2, 77, 64)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            want = fast_sampler.decoder(tok, dtype, compile=False)(lat, feats)
            got = fast_sampler.decoder(tok, dtype, compile=True)(lat, feats)
        assert want.std() > 1e-3
        assert (got - want).abs().max() <= 2 / 255


def test_cuda_modes_refuse_cpu(generator):
    for mode in ("graph", "reduce-overhead"):
        with pytest.raises(ValueError, match="CUDA"):
            FastSampler(generator, 2, steps=2, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        FastSampler(generator, 2, mode="fast")
    with pytest.raises(ValueError, match="shape"):
        FastSampler(generator, 2, steps=2, mode="eager")(torch.zeros(3, 77, 16))


# ---------------------------------------------------------------- CUDA (unverified without a GPU)


@needs_cuda
@pytest.mark.parametrize("impl, compile_", [("reference", False), ("triton", False), ("reference", True)])
def test_cuda_graph_equals_flow_sample(impl, compile_):
    g = ops.use(_generator("cuda"), impl)
    x0 = torch.randn(4, 77, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = flow.sample(g, x0, steps=5, cfg_scale=2.0)
    sampler = FastSampler(g, 4, steps=5, cfg_scale=2.0, mode="graph", compile=compile_)
    assert sampler.graph is not None
    # the same kernels replayed: equal; Inductor fuses and keeps fp32 between bf16 ops: close
    tol = dict(rtol=2e-2, atol=2e-2) if compile_ else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampler(x0), ref, **tol)
    x1 = torch.randn_like(x0)  # replays read the new input
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref1 = flow.sample(g, x1, steps=5, cfg_scale=2.0)
    torch.testing.assert_close(sampler(x1), ref1, **tol)


@needs_cuda
def test_cuda_reduce_overhead_matches():
    g = _generator("cuda")
    x0 = torch.randn(4, 77, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = flow.sample(g, x0, steps=3, cfg_scale=2.0)
    sampler = FastSampler(g, 4, steps=3, cfg_scale=2.0, mode="reduce-overhead")
    sampler(x0)  # first calls record the graphs
    torch.testing.assert_close(sampler(x0), ref, rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_cuda_loop_has_no_host_sync(impl):
    g = ops.use(_generator("cuda"), impl)
    sampler = FastSampler(g, 4, steps=3, cfg_scale=2.0, mode="eager")
    sampler(torch.randn(4, 77, 16, device="cuda"))  # warm-up: lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            sampler._loop()
    finally:
        torch.cuda.set_sync_debug_mode("default")
