"""Image-to-text: text decoder round trip, captioner, metrics, CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.captioning import FlowTokCaptioner
from flowtok_fast.cli import main as cli_main
from flowtok_fast.configs import TINY
from flowtok_fast.models.text import ClipTextEncoder, TextDecoder, TextVAE, detokenize, tokenize

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star", "a purple square"]


def test_text_decoder_round_trip_after_training_on_a_handful_of_captions():
    torch.manual_seed(0)
    clip, vae = ClipTextEncoder(TINY.clip).eval(), TextVAE(TINY.text_vae).eval()
    ids = tokenize(CAPTIONS)
    with torch.no_grad():
        z_text, _ = vae(clip(ids))  # posterior mean as Z_T
    dec = TextDecoder(TINY.text_vae)
    assert not torch.equal(dec.decode_ids(z_text), ids)  # untrained: wrong, so the test can fail
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        loss = dec.loss(z_text, ids)
        loss.backward()
        opt.step()
    dec.eval()
    assert torch.equal(dec.decode_ids(z_text), ids)
    assert detokenize(dec.decode_ids(z_text)) == CAPTIONS


def test_detokenize_stops_at_end_of_text():
    ids = tokenize(["a blue circle"])
    ids[0, 10:20] = 320  # junk after the end token is ignored
    assert detokenize(ids) == ["a blue circle"]


def test_captioner_shapes_and_directory_roundtrip(tmp_path):
    cap = FlowTokCaptioner.random("tiny", device="cpu")
    px = torch.rand(2, 3, 64, 64)
    z = cap.image_latents(px)
    assert z.shape == (2, 77, 16)
    out = cap(px, steps=2)
    assert len(out) == 2 and all(isinstance(c, str) for c in out)
    cap.save_pretrained(tmp_path / "i2t")
    again = FlowTokCaptioner.from_pretrained(tmp_path / "i2t", device="cpu")
    assert again(px, steps=2) == out


def test_cli_caption_json(tmp_path, capsys):
    paths = []
    for i in range(2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray((np.random.rand(80, 100, 3) * 255).astype(np.uint8)).save(p)  # non-square: resize + crop
        paths.append(str(p))
    cli_main(["caption", *paths, "--random-weights", "--steps", "2", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == paths and all("caption" in o for o in out)


def test_metrics_on_a_hand_made_set():
    from flowtok_fast.metrics import caption_metrics

    # ROUGE-L by hand: candidate "a red circle" vs "a red square circle": LCS 3, P = 1, R = 3/4,
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.75 / 2.19
    s = caption_metrics({1: "a red circle"}, {1: ["a red square circle"]}, spice=False, meteor=False)
    assert s["ROUGE-L"] == pytest.approx(2.44 * 0.75 / 2.19, abs=1e-6)
    assert s["exact_match"] == 0.0
    # identical captions: BLEU-4 = 1, METEOR ~ 1 (one chunk: penalty 0.5 / m^3)
    refs = {1: ["a red circle above a blue square"], 2: ["two green triangles on grass"]}
    s = caption_metrics({1: "a red circle above a blue square", 2: "two green triangles on grass"}, refs, spice=True)
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert s["METEOR"] > 0.99 and s["exact_match"] == 1.0
    assert "SPICE" in s or any("SPICE skipped" in n for n in s["notes"])
    with pytest.raises(ValueError, match="same ids"):
        caption_metrics({1: "x"}, {2: ["x"]})


def test_captioner_directory_names_each_component_by_what_it_holds(tmp_path):
    from flowtok_fast.checkpoint import read_pretrained

    cap = FlowTokCaptioner.random("tiny", device="cpu")
    cap.save_pretrained(str(tmp_path / "c"))
    _, parts = read_pretrained(str(tmp_path / "c"))
    assert parts["generator"].keys() == cap.generator.state_dict().keys()
    assert parts["tokenizer"].keys() == cap.tokenizer.state_dict().keys()
    assert parts["text_decoder"].keys() == cap.text_decoder.state_dict().keys()
