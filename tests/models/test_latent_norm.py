"""Latent normalisation: the reference default, fitting, loading (official files have no such
keys), saving, and its use by the trainer's frozen encoders."""
import pytest
import torch

from flowtok_fast import checkpoint as ckpt
from flowtok_fast.configs import LATENT_SCALE, TINY
from flowtok_fast.models.latent_norm import LatentNorm, fit_latent_norm
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.pipeline import FlowTokPipeline
from flowtok_fast.train.frozen import build_frozen, latents_from_moments


def _fitted_norm(seed=0) -> LatentNorm:
    g = torch.Generator().manual_seed(seed)
    norm = LatentNorm()
    norm.set(torch.randn(77, 16, generator=g), torch.rand(77, 16, generator=g) + 0.5)
    return norm


def test_default_is_the_reference_scale():
    torch.manual_seed(0)
    tok = FlowTiTok(TINY.tokenizer).eval()
    px = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        mean = tok.encoder(px, tok.latent_tokens).float()[:, :16]
        z = tok.encode(px, sample=False)
    assert tok.latent_norm.is_reference()
    # written out: the reference multiplies the [B,16,1,77] posterior by 1.0143 and transposes
    torch.testing.assert_close(z, (mean * 1.0143).flatten(2).transpose(1, 2), rtol=0, atol=0)
    back = tok.latent_norm.from_flow(z)
    torch.testing.assert_close(back, mean, rtol=1e-6, atol=1e-6)


def test_fit_standardises_each_element_and_floors_dead_ones():
    g = torch.Generator().manual_seed(1)
    spread = torch.rand(1, 16, 1, 77, generator=g) + 0.1
    offset = torch.randn(1, 16, 1, 77, generator=g) * 3
    means = torch.randn(500, 16, 1, 77, generator=g) * spread + offset
    means[:, 3, 0, 5] = 7.0  # a dead element: constant over images
    shift, scale = fit_latent_norm(means)
    norm = LatentNorm()
    norm.set(shift, scale)
    x = norm.to_flow(means)
    live = torch.ones(77, 16, dtype=torch.bool)
    live[5, 3] = False
    assert x.mean(0)[live].abs().max() < 1e-4 and (x.std(0)[live] - 1).abs().max() < 1e-4
    assert torch.isfinite(scale).all() and scale[5, 3] <= 1 / (1e-3 * float(spread.max()) * 0.9)
    torch.testing.assert_close(norm.from_flow(x), means, rtol=1e-5, atol=1e-4)
    moments = torch.cat([means, torch.zeros_like(means)], 1)  # [N,32,1,77]: the means are used
    assert all(torch.equal(a, b) for a, b in zip(fit_latent_norm(moments), (shift, scale)))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 16, 77), r"\[N, 16, 1, 77\]"),
    (torch.zeros(1, 16, 1, 77), "at least 2 images"),
])
def test_fit_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_latent_norm(bad)


def test_set_rejects_bad_stats():
    norm = LatentNorm()
    with pytest.raises(ValueError, match=r"\[77, 16\]"):
        norm.set(torch.zeros(16, 77), torch.ones(77, 16))
    with pytest.raises(ValueError, match="positive"):
        norm.set(torch.zeros(77, 16), -torch.ones(77, 16))
    with pytest.raises(ValueError, match="non-finite"):
        norm.set(torch.full((77, 16), float("nan")), torch.ones(77, 16))


def test_official_files_load_with_reference_values_and_ours_keep_theirs(tmp_path):
    src = FlowTiTok(TINY.tokenizer)
    official = {k: v for k, v in src.state_dict().items() if not k.startswith("latent_norm.")}
    torch.save(official, tmp_path / "official.bin")
    dst = FlowTiTok(TINY.tokenizer)
    dst.latent_norm.set(*_fitted_norm().state_dict().values())
    ckpt.load_tokenizer(dst, tmp_path / "official.bin")
    assert dst.latent_norm.is_reference()

    src.latent_norm.load_state_dict(_fitted_norm().state_dict())
    torch.save(src.state_dict(), tmp_path / "ours.bin")
    for with_encoder in (True, False):
        again = FlowTiTok(TINY.tokenizer, with_encoder=with_encoder)
        ckpt.load_tokenizer(again, tmp_path / "ours.bin")
        assert torch.equal(again.latent_norm.scale, src.latent_norm.scale)
        assert torch.equal(again.latent_norm.shift, src.latent_norm.shift)


def test_pipeline_directory_keeps_the_norm_and_decodes_through_it(tmp_path):
    pipe = FlowTokPipeline.random("tiny", seed=2, device="cpu")
    pipe.tokenizer.latent_norm.load_state_dict(_fitted_norm(3).state_dict())
    pipe.save_pretrained(str(tmp_path / "m"))
    again = FlowTokPipeline.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert torch.equal(again.tokenizer.latent_norm.scale, pipe.tokenizer.latent_norm.scale)
    lat, feats = torch.randn(2, 77, 16), torch.randn(2, 77, TINY.clip.width)
    with torch.no_grad():
        expected = pipe.tokenizer.decoder(pipe.tokenizer.latent_norm.from_flow(lat), feats).clamp(0, 1)
        reference = pipe.tokenizer.decoder((lat / LATENT_SCALE).transpose(1, 2).unsqueeze(2), feats).clamp(0, 1)
        got = again.decode(lat, feats)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, reference)  # the fitted norm is really used


def test_trainer_latents_use_the_tokenizer_files_norm_and_the_mean_option(tmp_path):
    tok = FlowTiTok(TINY.tokenizer)
    norm = _fitted_norm(4)
    tok.latent_norm.load_state_dict(norm.state_dict())
    torch.save(tok.state_dict(), tmp_path / "tok.bin")
    g = torch.Generator().manual_seed(5)
    moments = torch.cat([torch.randn(3, 16, 1, 77, generator=g), torch.full((3, 16, 1, 77), -2.0)], 1)
    frozen = build_frozen(TINY, None, str(tmp_path / "tok.bin"), with_image=False, latent_sampling="mean")
    ids = torch.zeros(3, 77, dtype=torch.long)
    _, z = frozen({"moments": moments, "ids": ids}, torch.device("cpu"))
    expected = (moments[:, :16].flatten(2).transpose(1, 2) - norm.shift) * norm.scale
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
    # "sample": mean + exp(logvar / 2) * eps with torch's global generator, then the same map
    torch.manual_seed(6)
    sampled = latents_from_moments(moments, norm, "sample")
    torch.manual_seed(6)
    eps = torch.randn(3, 16, 1, 77)
    by_hand = ((moments[:, :16] + torch.exp(torch.tensor(-1.0)) * eps).flatten(2).transpose(1, 2) - norm.shift) * norm.scale
    torch.testing.assert_close(sampled, by_hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent sampling"):
        latents_from_moments(moments, norm, "mode")
