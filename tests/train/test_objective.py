"""Each loss term against values worked out by hand (spec section 3)."""
import math

import pytest
import torch

from flowtok_fast import objective as obj
from flowtok_fast.configs import TINY
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.objective import FlowTokObjective, LossWeights, alignment_loss, cfg_drop, flow_loss, flow_path, kl_loss


def test_flow_path_by_hand():
    z_text = torch.full((1, 77, 16), 1.0)
    z_img = torch.full((1, 77, 16), 3.0)
    x_t, v = flow_path(z_text, z_img, torch.tensor([0.5]))
    # (1 - (1 - 1e-5) * 0.5) * 1 + 0.5 * 3 = 0.500005 + 1.5 ; v = 3 - 0.99999 * 1
    assert torch.allclose(x_t, torch.full_like(x_t, 2.000005), atol=0, rtol=1e-7)
    assert torch.allclose(v, torch.full_like(v, 2.00001), atol=0, rtol=1e-7)
    # the ends: t = 0 is the source exactly, t = 1 is sigma_min * source + destination
    x0, _ = flow_path(z_text, z_img, torch.tensor([0.0]))
    x1, _ = flow_path(z_text, z_img, torch.tensor([1.0]))
    assert torch.equal(x0, z_text)
    assert torch.allclose(x1, torch.full_like(x1, 3.00001), atol=0, rtol=1e-7)


def test_flow_loss_is_mean_of_per_sample_means():
    pred = torch.zeros(2, 77, 16)
    target = torch.stack([torch.full((77, 16), 1.0), torch.full((77, 16), 2.0)])
    target[1, 0, 0] = 2.0 + math.sqrt(1232.0)  # one element of sample 1 off by sqrt(77*16)
    # sample 0: 1 ; sample 1: 4 + ((2 + s)^2 - 4) / 1232 = 4 + (4 s + s^2) / 1232 = 5 + 4 s / 1232
    s = math.sqrt(1232.0)
    expected = (1.0 + 5.0 + 4 * s / 1232) / 2
    assert flow_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def _unit(b, *hot):
    """[b, 77, 16] with the listed (sample, flat index, value) entries set."""
    z = torch.zeros(b, 77 * 16)
    for i, j, val in hot:
        z[i, j] = val
    return z.view(b, 77, 16)


def test_alignment_loss_identity_pairs():
    # z_i = 3 e_i, p_i = e_i: after normalisation z p^T = I; scale exp(0) = 1;
    # each CE = log(1 + e^-1) = 0.31326169, both directions the same
    z = _unit(2, (0, 0, 3.0), (1, 1, 3.0))
    p = _unit(2, (0, 0, 1.0), (1, 1, 1.0))
    assert alignment_loss(z, p, torch.tensor(0.0)).item() == pytest.approx(0.31326169, abs=1e-6)


def test_alignment_loss_asymmetric_and_temperature():
    # z_0 = e_0, z_1 = (e_0 + e_1)/sqrt2 ; p_0 = e_0, p_1 = e_1  ->  z p^T = [[1, 0], [r, r]], r = 0.70710678
    # rows:    CE([1, 0], 0) = log(1 + e^-1) = 0.31326169 ; CE([r, r], 1) = log 2 = 0.69314718
    # columns: CE([1, r], 0) = log(1 + e^(r-1)) = 0.55738576 ; CE([0, r], 1) = log(1 + e^-r) = 0.40083353
    # loss = ((0.31326169 + 0.69314718)/2 + (0.55738576 + 0.40083353)/2) / 2 = 0.49115704
    z = _unit(2, (0, 0, 1.0), (1, 0, 1.0), (1, 1, 1.0))
    p = _unit(2, (0, 0, 2.0), (1, 1, 5.0))
    assert alignment_loss(z, p, torch.tensor(0.0)).item() == pytest.approx(0.49115704, abs=1e-6)
    # logit scale exp(ln 2) = 2: logits [[2, 0], [2r, 2r]]
    # rows: log(1 + e^-2) = 0.12692801, log 2 ; cols: log(1 + e^(2r-2)) = 0.44254758, log(1 + e^-2r) = 0.21762172
    # loss = ((0.12692801 + 0.69314718)/2 + (0.44254758 + 0.21762172)/2) / 2 = 0.37006112
    assert alignment_loss(z, p, torch.tensor(math.log(2.0))).item() == pytest.approx(0.37006112, abs=1e-6)


def test_alignment_loss_temperature_shape_1():
    # the trainer keeps the temperature as shape [1] (FSDP cannot shard 0-d parameters)
    z = _unit(2, (0, 0, 3.0), (1, 1, 3.0))
    assert alignment_loss(z, z, torch.tensor([0.0])).shape == ()


def test_kl_reference_and_per_sample_by_hand():
    mu = torch.zeros(2, 77, 16)
    logvar = torch.zeros(2, 77, 16)
    # all-zero elements contribute -0.5 (1 + 0 - 0 - 1) = 0
    mu[0, 0, 0] = 1.0  # -0.5 (1 - 0.3^6 - 1) = 0.0003645
    logvar[1, 5, 3] = 1.0  # -0.5 (1 + 1 - e) = 0.35914091
    mu[1, 2, 2], logvar[1, 2, 2] = 2.0, -1.0  # -0.5 (1 - 1 - 0.6^6 - e^-1) = 0.5 (0.046656 + 0.36787944) = 0.20726772
    total = 0.0003645 + 0.35914091 + 0.20726772
    assert kl_loss(mu, logvar, "reference").item() == pytest.approx(total, abs=1e-6)
    # per sample: [0.0003645, 0.35914091 + 0.20726772], averaged
    assert kl_loss(mu, logvar, "per_sample").item() == pytest.approx(total / 2, abs=1e-6)
    with pytest.raises(ValueError, match="KL form"):
        kl_loss(mu, logvar, "paper")


def test_kl_reference_sums_over_the_local_batch():
    mu, logvar = torch.zeros(4, 77, 16), torch.ones(4, 77, 16)
    per_elem = -0.5 * (2 - math.e)
    assert kl_loss(mu, logvar).item() == pytest.approx(per_elem * 4 * 77 * 16, rel=1e-5)
    assert kl_loss(mu, logvar, "per_sample").item() == pytest.approx(per_elem * 77 * 16, rel=1e-5)


def _numbered(b):
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 77, 16).clone()


def test_cfg_drop_rolls_targets_within_the_selected_set():
    targets = _numbered(6)
    selected = torch.tensor([False, True, False, True, True, False])
    indicator, out = cfg_drop(targets, selected)
    assert indicator.tolist() == [0, 1, 0, 1, 1, 0]
    # sample 1 takes sample 3's image, 3 takes 4's, 4 takes 1's (the next selected, cyclically)
    assert out[:, 0, 0].tolist() == [0, 3, 2, 4, 1, 5]
    assert torch.equal(targets, _numbered(6)), "the input must not be modified"


def test_cfg_drop_two_selected_swap():
    indicator, out = cfg_drop(_numbered(4), torch.tensor([True, False, False, True]))
    assert indicator.tolist() == [1, 0, 0, 1]
    assert out[:, 0, 0].tolist() == [3, 1, 2, 0]


@pytest.mark.parametrize("selected", [[False, False, False], [False, True, False]])
def test_cfg_drop_zero_or_one_selected_drops_nothing(selected):
    indicator, out = cfg_drop(_numbered(3), torch.tensor(selected))
    assert indicator.tolist() == [0, 0, 0]
    assert torch.equal(out, _numbered(3))


def test_cfg_drop_rejects_bad_mask():
    with pytest.raises(ValueError, match="bool tensor of shape"):
        cfg_drop(_numbered(3), torch.tensor([1, 0, 1]))


def test_sample_t_is_logit_normal():
    torch.manual_seed(0)
    t = obj.sample_t(20000, "cpu")
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03


def test_sample_t_uniform_option_and_bad_kind():
    torch.manual_seed(0)
    t = obj.sample_t(20000, "cpu", "uniform")
    assert (t < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)  # logit-normal gives ~0.014
    assert (obj.sample_t(20000, "cpu") < 0.1).float().mean().item() == pytest.approx(0.014, abs=0.005)
    with pytest.raises(ValueError, match="t sampling"):
        obj.sample_t(4, "cpu", "cosine")
    with pytest.raises(ValueError, match="t sampling"):
        obj.FlowTokObjective(torch.nn.Linear(1, 1), t_sampling="cosine")
    with pytest.raises(ValueError, match="t_logit_scale"):
        obj.FlowTokObjective(torch.nn.Linear(1, 1), t_logit_scale=0.0)


def test_sample_t_logit_normal_location_and_scale():
    torch.manual_seed(1)
    t = obj.sample_t(40000, "cpu", "logit_normal", -1.5, 0.5)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-1.5, abs=0.02) and logit.std().item() == pytest.approx(0.5, abs=0.02)


def _objective(direction="t2i", **weights):
    torch.manual_seed(0)
    gen = FlowTokGenerator(TINY.generator, TINY.text_vae)
    with torch.no_grad():  # non-zero output layer so the generator's prediction matters
        torch.nn.init.normal_(gen.final_layer.linear.weight, std=0.02)
    return FlowTokObjective(gen, LossWeights(**weights), direction)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_objective_wires_the_path_and_terms(direction, monkeypatch):
    o = _objective(direction, cfg_prob=0.0)
    feats, z_img = torch.randn(3, 77, TINY.clip.width), torch.randn(3, 77, 16)
    seen = {}
    sample = obj.TextVAE.sample
    monkeypatch.setattr(obj.TextVAE, "sample", staticmethod(lambda mu, lv: seen.setdefault("z_text", sample(mu, lv))))
    o.generator.register_forward_hook(lambda m, args, out: seen.update(args=args, pred=out))
    out = o(feats, z_img)
    x, t, ind = seen["args"]
    z_text = seen["z_text"]
    src, dst = (z_text, z_img) if direction == "t2i" else (z_img, z_text)
    tt = t.view(-1, 1, 1)
    assert torch.allclose(x, (1 - (1 - 1e-5) * tt) * src + tt * dst, atol=1e-6)
    assert ind.tolist() == [0, 0, 0]
    v = dst - (1 - 1e-5) * src
    assert out["flow"].item() == pytest.approx(((seen["pred"] - v) ** 2).mean().item(), rel=1e-5)
    w_align, w_kl = (1.0, 0.01) if direction == "t2i" else (0.0, 0.0)
    expected = out["flow"] + w_align * out["align"] + w_kl * out["kl"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_reach_text_vae_projector_temperature_and_dit():
    o = _objective()
    out = o(torch.randn(4, 77, TINY.clip.width), torch.randn(4, 77, 16))
    out["loss"].backward()
    g = o.generator
    for name, p in [
        ("text VAE", g.context_encoder.layers[0].attn.W_Q.weight),
        ("projector", g.context_projector[0].weight),
        ("temperature", g.t2t_temperature),
        ("DiT block (adaLN-Zero: the gates first)", g.blocks[0].adaLN_modulation[-1].weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_flow_term_alone_reaches_the_text_vae():
    o = _objective(align=0.0, kl=0.0)
    o(torch.randn(4, 77, TINY.clip.width), torch.randn(4, 77, 16))["loss"].backward()
    assert o.generator.context_encoder.linear.weight.grad.abs().sum() > 0


def test_objective_rejects_bad_inputs():
    o = _objective()
    with pytest.raises(ValueError, match="z_img must be latents"):
        o(torch.randn(2, 77, TINY.clip.width), torch.randn(2, 77, 8))
    with pytest.raises(ValueError, match="clip_feats must be"):
        o(torch.randn(3, 77, TINY.clip.width), torch.randn(2, 77, 16))
    with pytest.raises(ValueError, match="direction"):
        FlowTokObjective(o.generator, direction="t2t")
