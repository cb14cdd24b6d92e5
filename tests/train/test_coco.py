"""COCO Karpathy split -> shards + references, read back by the webdataset source."""
import json
import tarfile

import numpy as np
from PIL import Image

from flowtok_fast.cli import main as cli_main
from flowtok_fast.train.coco import read_karpathy


def _fake_coco(tmp_path):
    (tmp_path / "val2014").mkdir()
    images = []
    for i, split in enumerate(["train", "restval", "test", "test", "val"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        if i != 3:  # image 3 is missing on disk: skipped and counted
            Image.fromarray((np.random.rand(40, 50, 3) * 255).astype(np.uint8)).save(tmp_path / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "cocoid": 100 + i, "split": split,
                       "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b "}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return tmp_path / "dataset_coco.json"


def test_read_karpathy_splits(tmp_path):
    js = _fake_coco(tmp_path)
    train = read_karpathy(str(js), "train")
    assert [e["id"] for e in train] == ["100", "101"]  # train includes restval
    assert train[0]["captions"] == ["caption 0 a", "caption 0 b"]
    assert [e["id"] for e in read_karpathy(str(js), "test")] == ["102", "103"]


def test_convert_train_pairs_and_test_references(tmp_path, capsys):
    js = _fake_coco(tmp_path)
    out = tmp_path / "shards"
    assert cli_main_rc(["coco-karpathy", "--json", str(js), "--images", str(tmp_path), "--split", "train",
                        "--out", str(out / "train")]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["images"] == 2 and counts["samples"] == 4  # one sample per (image, caption)
    with tarfile.open(out / "train" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert "100_0.jpg" in names and "100_1.txt" in names
    refs = tmp_path / "refs.json"
    assert cli_main_rc(["coco-karpathy", "--json", str(js), "--images", str(tmp_path), "--split", "test",
                        "--out", str(out / "test"), "--references", str(refs)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["missing_image"] == 1 and counts["samples"] == 1
    assert json.loads(refs.read_text()) == {"102": ["caption 2 a", "caption 2 b"]}


def cli_main_rc(argv):
    try:
        cli_main(argv)
    except SystemExit as e:
        return e.code
    return 0
