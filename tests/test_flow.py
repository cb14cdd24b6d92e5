"""Sampler: time grid, batched CFG, determinism, Heun."""
import pytest
import torch

from flowtok_fast import flow
from flowtok_fast.configs import TINY
from flowtok_fast.models.generator import FlowTokGenerator


def test_reference_grid_n5():
    times, dt = flow.time_grid(5, "reference")
    # linspace(0, 1 - 1e-5, 5): i * (1 - 1e-5) / 4, i.e. 0, 0.25, 0.5, 0.75, 0.99999 to 5 digits
    assert times == pytest.approx([i * (1 - 1e-5) / 4 for i in range(5)], abs=1e-12)
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 0.99999], abs=1e-5)
    assert dt == pytest.approx((1 - 1e-5) / 5, abs=1e-15)


def test_consistent_grid_n5():
    times, dt = flow.time_grid(5, "consistent")
    assert times == pytest.approx([i * (1 - 1e-5) / 5 for i in range(5)], abs=1e-12)


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(0)
    with pytest.raises(ValueError, match="time grid"):
        flow.time_grid(4, "linear")


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    g = FlowTokGenerator(TINY.generator, TINY.text_vae).eval()
    # DiT zero-inits adaLN and the output: randomise so the model actually depends on its inputs
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return g


@torch.no_grad()
def test_batched_cfg_equals_two_forwards(generator):
    x = torch.randn(3, 77, 16)
    xs, ts, ind = flow.cfg_batch(x, 0.3, guided=True)
    assert ind.tolist() == [0, 0, 0, 1, 1, 1]
    v = generator(xs, ts, ind)
    v_c = generator(x, torch.full((3,), 0.3), torch.zeros(3, dtype=torch.long))
    v_u = generator(x, torch.full((3,), 0.3), torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(v[:3], v_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[3:], v_u, atol=1e-5, rtol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-3  # the indicator matters, so the test can fail


@torch.no_grad()
def test_euler_matches_direct_loop(generator):
    """The sampler equals the reference loop written out: two separate forwards per step at
    t_i = linspace(0, 1-1e-5, N)[i], state advanced by dt = (1-1e-5)/N."""
    x0 = torch.randn(2, 77, 16)
    out = flow.sample(generator, x0, steps=4, cfg_scale=2.0)
    x, dt = x0.clone(), (1 - 1e-5) / 4
    for t in torch.linspace(0, 1 - 1e-5, 4).tolist():
        tt = torch.full((2,), t)
        v_c = generator(x, tt, torch.zeros(2, dtype=torch.long))
        v_u = generator(x, tt, torch.ones(2, dtype=torch.long))
        x = x + (v_u + 2.0 * (v_c - v_u)) * dt
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, x0)


@torch.no_grad()
def test_sampler_deterministic_and_options(generator):
    x0 = torch.randn(2, 77, 16)
    a = flow.sample(generator, x0, steps=3)
    b = flow.sample(generator, x0, steps=3)
    assert torch.equal(a, b)
    no_cfg = flow.sample(generator, x0, steps=3, cfg_scale=1.0)
    assert not torch.allclose(a, no_cfg)
    heun = flow.sample(generator, x0, steps=3, method="heun")
    assert heun.shape == x0.shape and torch.isfinite(heun).all()
    with pytest.raises(ValueError, match="sampler"):
        flow.sample(generator, x0, steps=3, method="rk4")


@torch.no_grad()
def test_heun_is_second_order_on_a_linear_field():
    """dx/dt = -x: Heun's error shrinks ~4x when the steps double; Euler's ~2x."""

    def field(x, t, ind):
        return -x

    x0 = torch.ones(1, 77, 16)
    exact = torch.exp(torch.tensor(-(1 - 1e-5)))
    err = {m: [(flow.sample(field, x0, n, 1.0, m, "consistent") - exact).abs().max().item() for n in (8, 16)]
           for m in ("euler", "heun")}
    assert err["heun"][0] / err["heun"][1] > 3.5
    assert 1.7 < err["euler"][0] / err["euler"][1] < 2.3


@pytest.mark.parametrize("grid", ["reference", "consistent"])
def test_sampler_follows_the_training_path_in_both_directions(grid):
    """With the exact velocity of the training path (t = 0 source, t = 1 destination), the
    sampler lands on the path's end point: text -> image for t2i, image -> text for i2t."""
    from flowtok_fast.objective import flow_path

    z_text, z_img = torch.randn(2, 77, 16), torch.randn(2, 77, 16)
    for src, dst in ((z_text, z_img), (z_img, z_text)):
        _, v = flow_path(src, dst, torch.zeros(2))
        end = flow.sample(lambda x, t, ind: v.expand(x.shape[0], -1, -1), src, steps=7, cfg_scale=1.0, grid=grid)
        expected, _ = flow_path(src, dst, torch.full((2,), flow.T_END))
        torch.testing.assert_close(end, expected, atol=1e-5, rtol=1e-5)
        assert (end - dst).abs().max() < 1e-3  # and that is (almost) the destination
