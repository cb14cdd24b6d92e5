"""CLIP score from a local open_clip file: a tiny registered config with random weights stands in
for ViT-L/14 (same code path, loaded from the file the user passes)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation.clip_score import ClipScorer

NAME = "flowtok-test-tiny-clip"


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{NAME}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(root / f"{NAME}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    torch.save(model.state_dict(), root / "clip.pt")
    return str(root / "clip.pt"), model.eval()


def test_score_is_100_times_clipped_cosine(clip_file):
    import open_clip

    path, model = clip_file
    scorer = ClipScorer(path, NAME, batch_size=2)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)) for i in range(3)]
    prompts = ["a red cube", "two dogs", "a city at night"]
    got = scorer(images, prompts)
    with torch.no_grad():  # the definition, computed directly from the reference model's embeddings
        _, _, transform = open_clip.create_model_and_transforms(NAME)
        a = model.encode_image(torch.stack([transform(im) for im in images]))
        b = model.encode_text(open_clip.get_tokenizer(NAME)(prompts))
        expected = (100 * torch.cosine_similarity(a, b, dim=-1).clamp(min=0)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_bad_clip_files(clip_file, tmp_path):
    with pytest.raises(UserError, match="file not found"):
        ClipScorer(str(tmp_path / "none.pt"), NAME)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot load as open_clip") as err:
        ClipScorer(str(tmp_path / "bad.pt"), NAME)
    assert "\n" not in str(err.value)
