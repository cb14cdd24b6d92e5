"""Official layouts and our safetensors directories: round trips and clear errors."""
import json

import pytest
import torch

from flowtok_fast import checkpoint as ckpt
from flowtok_fast.configs import TINY, TokenizerConfig
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import ClipTextEncoder
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.pipeline import FlowTokPipeline


def _tiny_generator():
    return FlowTokGenerator(TINY.generator, TINY.text_vae)


def test_official_generator_roundtrip_with_module_prefix_and_open_clip_keys(tmp_path):
    src = _tiny_generator()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.open_clip.token_embedding.weight"] = torch.zeros(3, 3)  # unused, must be ignored
    path = tmp_path / "FlowTok-tiny.pth"
    torch.save(sd, path)
    dst = _tiny_generator()
    with torch.no_grad():
        dst.x_embedder.weight.zero_()
    ckpt.load_generator(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_generator_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    sd = _tiny_generator().state_dict()
    sd.pop("blocks.0.attn.qkv.bias")
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    sd["x_embedder.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_generator(_tiny_generator(), path)
    msg = str(err.value)
    assert "missing keys (1): blocks.0.attn.qkv.bias" in msg
    assert "unexpected keys (1): blocks.0.attn.extra" in msg
    assert "x_embedder.bias: checkpoint (5,)" in msg


def test_pos_embed_is_checked_against_recomputation(tmp_path):
    sd = _tiny_generator().state_dict()
    sd["pos_embed"] = sd["pos_embed"] + 0.1
    torch.save(sd, tmp_path / "g.pth")
    with pytest.raises(ckpt.CheckpointError, match="pos_embed"):
        ckpt.load_generator(_tiny_generator(), tmp_path / "g.pth")


def test_tokenizer_roundtrip_and_resolution_inference(tmp_path):
    cfg = TINY.tokenizer
    src = FlowTiTok(cfg)
    torch.save(src.state_dict(), tmp_path / "tok.bin")
    assert ckpt.tokenizer_resolution_from_state_dict(src.state_dict()) == cfg.resolution
    dst = FlowTiTok(cfg)
    ckpt.load_tokenizer(dst, tmp_path / "tok.bin")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    decode_only = FlowTiTok(cfg, with_encoder=False)  # the text-to-image pipeline's tokenizer
    ckpt.load_tokenizer(decode_only, tmp_path / "tok.bin")


def test_512_tokenizer_into_256_model_names_the_resolution(tmp_path):
    with torch.device("meta"):
        big = FlowTiTok(TokenizerConfig(resolution=512), with_encoder=False)
    # a decoder-only 512 px file with real RoPE tables (the rest may stay tiny: the check comes first)
    sd = {k: torch.zeros(v.shape) for k, v in big.state_dict().items() if "transformer" not in k}
    cos, sin = ckpt.rope_2d_tables(32, 64)
    sd["decoder.positional_embedding.freqs_cos"], sd["decoder.positional_embedding.freqs_sin"] = cos, sin
    torch.save(sd, tmp_path / "FlowTiTok_512.bin")
    assert ckpt.tokenizer_resolution_from_state_dict(sd) == 512
    small = FlowTiTok(TokenizerConfig(resolution=256, decoder_layers=1, encoder_layers=1), with_encoder=False)
    with pytest.raises(ckpt.CheckpointError, match="512 px tokenizer.*built for 256 px"):
        ckpt.load_tokenizer(small, tmp_path / "FlowTiTok_512.bin")


def test_clip_loader_keeps_text_tower_only(tmp_path):
    src = ClipTextEncoder(TINY.clip)
    sd = dict(src.state_dict())
    sd.update({"visual.conv1.weight": torch.zeros(2), "text_projection": torch.zeros(64, 64),
               "logit_scale": torch.zeros(()), "attn_mask": torch.zeros(77, 77)})
    torch.save(sd, tmp_path / "clip.bin")
    dst = ClipTextEncoder(TINY.clip)
    ckpt.load_clip(dst, tmp_path / "clip.bin")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.read_state_dict(bad)
    with pytest.raises(FileNotFoundError):
        ckpt.read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="flowtok-fast convert"):
        ckpt.read_pretrained(tmp_path)


def test_pretrained_directory_roundtrip(tmp_path):
    pipe = FlowTokPipeline.random("tiny", seed=1, device="cpu")
    pipe.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["name"] == "tiny"
    again = FlowTokPipeline.from_pretrained(tmp_path / "m", device="cpu")
    for a, b in ((pipe.generator, again.generator), (pipe.clip, again.clip), (pipe.tokenizer, again.tokenizer)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_failed_save_leaves_no_partial_files(tmp_path, monkeypatch):
    pipe = FlowTokPipeline.random("tiny", device="cpu")
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []
