"""`flowtok-fast evaluate i2t` on the tiny random captioner: the Karpathy test split captioned in
shards, a rerun captions nothing again, scored by metrics.caption_metrics beside the paper."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from flowtok_fast.evaluation import cli


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from flowtok_fast.captioning import FlowTokCaptioner

    root = tmp_path_factory.mktemp("i2t")
    FlowTokCaptioner.random("tiny").save_pretrained(str(root / "model"))
    (root / "coco" / "val2014").mkdir(parents=True)
    images = []
    for i in range(5):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / "coco" / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "cocoid": i, "split": "test" if i < 4 else "val",
                       "sentences": [{"raw": f"a picture of thing {i}"}, {"raw": "a blurry photo"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return root


def i2t_args(root, out):
    # --no-meteor: METEOR's Java start alone takes ~40 s on the CI box
    return ["i2t", "--no-progress", "--no-spice", "--no-meteor", "--model-dir", str(root / "model"), "--karpathy", str(root / "dataset_coco.json"),
            "--images", str(root / "coco"), "--out", str(out), "--steps", "1", "--batch-size", "2", "--shard-size", "3"]


@pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java (PTB tokenizer, METEOR)")
def test_captions_the_test_split_and_resumes(coco, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(i2t_args(coco, out)) == 0
    captions = json.loads((out / "captions.json").read_text())
    assert sorted(captions) == ["0", "1", "2", "3"]  # the test split only
    results = json.loads((out / "results.json").read_text())
    assert results["shards_captioned"] == 2 and 0 <= results["metrics"]["BLEU-4"] <= 1
    md = (out / "results.md").read_text()
    assert "117.0" in md and "37.1" in md
    mtime = os.stat(out / "captions" / "shard-00000.json").st_mtime_ns
    os.remove(out / "captions" / "shard-00001.json")  # as if killed before the last shard
    assert cli.main(i2t_args(coco, out)) == 0
    assert json.loads((out / "results.json").read_text())["shards_captioned"] == 1
    assert os.stat(out / "captions" / "shard-00000.json").st_mtime_ns == mtime
    assert json.loads((out / "captions.json").read_text()) == captions


def test_missing_image_is_one_line(coco, tmp_path, capsys):
    broken = tmp_path / "coco"
    shutil.copytree(coco / "coco", broken)
    os.remove(broken / "val2014" / "COCO_val2014_000000000002.jpg")
    args = i2t_args(coco, tmp_path / "eval")
    args[args.index("--images") + 1] = str(broken)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "1 image(s) of the split missing" in err and "\n" not in err
    assert not (tmp_path / "eval").exists()
