"""Text-to-image end to end on the tiny config, and the CLI."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from flowtok_fast.cli import main as cli_main
from flowtok_fast.pipeline import FlowTokPipeline


@pytest.fixture(scope="module")
def pipe():
    return FlowTokPipeline.random("tiny", seed=0, device="cpu")


def test_images_have_the_right_size_and_are_bit_identical_for_a_seed(pipe):
    prompts = ["a red circle", "two blue squares on grass"]
    a = pipe(prompts, steps=3, cfg_scale=2.0, seed=7, output="tensor")
    b = pipe(prompts, steps=3, cfg_scale=2.0, seed=7, output="tensor")
    assert a.shape == (2, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0
    c = pipe(prompts, steps=3, cfg_scale=2.0, seed=8, output="tensor")
    assert not torch.equal(a, c)  # the seed drives the text-VAE sample
    ims = pipe(prompts[0], steps=2)
    assert len(ims) == 1 and isinstance(ims[0], Image.Image) and ims[0].size == (64, 64)


def test_stages_have_the_documented_shapes(pipe):
    feats = pipe.encode_text(["x", "y", "z"])
    assert feats.shape == (3, 77, 64)
    z = pipe.text_latents(feats, pipe.generator_rng(0))
    assert z.shape == (3, 77, 16) and z.dtype == torch.float32
    with pytest.raises(ValueError, match=r"latents must be \[B, 77, 16\]"):
        pipe.decode(torch.zeros(3, 77, 8), feats)
    with pytest.raises(ValueError, match="text features"):
        pipe.decode(z, feats[:2])
    with pytest.raises(ValueError, match=r"\[B, 77\]"):
        pipe.clip(torch.zeros(2, 70, dtype=torch.long))


def test_tokenizer_encode_decode_shapes():
    from flowtok_fast.configs import TINY
    from flowtok_fast.models.tokenizer import FlowTiTok

    tok = FlowTiTok(TINY.tokenizer).eval()
    with torch.no_grad():
        z = tok.encode(torch.rand(3, 3, 64, 64), sample=False)
        assert z.shape == (3, 77, 16)
        assert tok.decode(z, torch.randn(3, 77, 64)).shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        tok.encode(torch.rand(1, 3, 32, 32))


def test_cli_generate_random_weights(tmp_path, capsys):
    out = tmp_path / "grid.png"
    cli_main(["generate", "--random-weights", "--prompt", "a cat", "--prompt", "a dog",
              "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert "untrained, so the image means nothing" in capsys.readouterr().out
    im = Image.open(out)
    assert im.size == (128, 64)  # 2 images side by side


def test_cli_refuses_without_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flowtok_fast", "generate", "--prompt", "x", "--out", str(tmp_path / "a.png")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--random-weights" in r.stderr
    r = subprocess.run([sys.executable, "-m", "flowtok_fast", "generate", "--prompt", "x", "--checkpoint", "a.pth"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "must be given together" in r.stderr


def test_cli_convert_official_files_then_generate(tmp_path, pipe):
    """Official-layout files (tiny sizes) -> `convert` -> our directory -> the same images."""
    torch.save({f"module.{k}": v for k, v in pipe.generator.state_dict().items()}, tmp_path / "FlowTok.pth")
    from flowtok_fast.models.tokenizer import FlowTiTok

    tok = FlowTiTok(pipe.config.tokenizer)
    tok.decoder.load_state_dict(pipe.tokenizer.decoder.state_dict())
    torch.save(tok.state_dict(), tmp_path / "FlowTiTok.bin")
    torch.save({**pipe.clip.state_dict(), "visual.proj": torch.zeros(2)}, tmp_path / "clip.bin")
    cli_main(["convert", "--checkpoint", str(tmp_path / "FlowTok.pth"), "--tokenizer", str(tmp_path / "FlowTiTok.bin"),
              "--clip", str(tmp_path / "clip.bin"), "--out", str(tmp_path / "converted")])
    again = FlowTokPipeline.from_pretrained(str(tmp_path / "converted"), device="cpu")
    a = pipe(["a red circle"], steps=2, seed=3, output="tensor")
    b = again(["a red circle"], steps=2, seed=3, output="tensor")
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        FlowTokPipeline.from_official(str(tmp_path / "no.pth"), "t", "c")


def test_compiled_sampler_mode_matches_eager(pipe):
    prompts = ["a red circle", "a blue square", "a green star"]
    eager = pipe(prompts, steps=3, seed=5, output="tensor")
    fast = FlowTokPipeline(pipe.config, pipe.clip, pipe.generator, pipe.tokenizer, device="cpu", sampler_mode="compile")
    out = fast(prompts, steps=3, seed=5, output="tensor")
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)
    assert len(fast._fast_samplers) == 1
    with pytest.raises(ValueError, match="sampler mode"):
        FlowTokPipeline(pipe.config, pipe.clip, pipe.generator, pipe.tokenizer, device="cpu", sampler_mode="fast")
