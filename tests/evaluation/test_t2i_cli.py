"""`flowtok-fast evaluate t2i` end to end on the tiny random pipeline and the stand-in Inception:
results files, resume with no regeneration, FID of a set against its own statistics ~ 0, and
every bad input a one-line error that leaves nothing behind."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from flowtok_fast.evaluation import cli, fid_stats
from tests.evaluation.tiny_inception import save_tiny_inception


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from flowtok_fast.pipeline import FlowTokPipeline

    root = tmp_path_factory.mktemp("t2i")
    FlowTokPipeline.random("tiny").save_pretrained(str(root / "model"))
    (root / "ref").mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(f"a photo of {i} red cubes" for i in range(8)))
    return {"root": root, "model": str(root / "model"), "inception": save_tiny_inception(root / "inception.pt"),
            "prompts": str(root / "prompts.txt"), "ref": str(root / "ref")}


def t2i_args(f, out, **over):
    args = {"--model-dir": f["model"], "--prompts": f["prompts"], "--reference": f["ref"], "--inception": f["inception"],
            "--num-images": "5", "--out": str(out), "--steps": "1", "--shard-size": "3", "--batch-size": "2"}
    args.update(over)
    return ["t2i", "--no-progress"] + [x for k, v in args.items() if v is not None for x in (k, v)]


def test_end_to_end_then_resume_against_own_statistics(files, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(t2i_args(files, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 5 and np.isfinite(results["fid"]) and results["fid"] > 1
    assert results["versions"]["clean-fid"] == "0.1.35" and results["settings"]["steps"] == 1
    assert results["timing_rank0"]["shards_generated"] == 2
    md = (out / "results.md").read_text()
    assert "10.06" in md and "9.67" in md
    assert Image.open(out / "grid.png").size[0] == 8 * 128
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 5

    # image 3 (shard 1, second in its shard) alone, in a batch of one: the same image (seed = f(index))
    from flowtok_fast.evaluation.generation import pipeline_images
    from flowtok_fast.evaluation.shards import image_seed
    from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions

    alone = pipeline_images(FlowTokPipeline.from_pretrained(files["model"]), SamplingOptions(steps=1))(
        ["a photo of 3 red cubes"], [image_seed(0, 3)])[0]
    saved = Image.open(out / "images" / "shard-00001" / "000003.png")
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(saved, np.int16)).max() <= 1

    stats = str(tmp_path / "own.npz")
    assert fid_stats.main([str(out / "images"), "--inception", files["inception"], "--out", stats]) == 0
    capsys.readouterr()
    assert cli.main(t2i_args(files, out, **{"--reference": stats})) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["timing_rank0"]["shards_generated"] == 0 and again["timing_rank0"]["shards_rescored"] == 0
    assert abs(again["fid"]) < 1e-3


def bad_stats(f, tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, mu=np.zeros(8), sigma=np.eye(8))
    return {"--reference": str(path)}


def corrupt_inception(f, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    return {"--inception": str(tmp_path / "bad.pt")}


def empty_prompts(f, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    return {"--prompts": str(tmp_path / "empty.txt")}


def unwritable_out(f, tmp_path):
    (tmp_path / "a-file").write_text("x")
    return {"--out": str(tmp_path / "a-file" / "eval")}


@pytest.mark.parametrize("make,expected", [
    (lambda f, t: {"--inception": None}, "inception-2015-12-05.pt"),
    (lambda f, t: {"--inception": str(t / "missing.pt")}, "file not found"),
    (corrupt_inception, "not a TorchScript Inception"),
    (bad_stats, "dimension 8"),
    (empty_prompts, "no prompts found"),
    (lambda f, t: {"--num-images": "9"}, "exceeds the 8 prompts"),
    (unwritable_out, "cannot write there"),
])
def test_bad_input_is_one_line_and_leaves_nothing(files, tmp_path, capsys, make, expected):
    over = make(files, tmp_path)
    out = over.get("--out", str(tmp_path / "eval"))
    before = sorted(os.listdir(tmp_path))
    assert cli.main(t2i_args(files, out, **{"--out": out, **over})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowtok-fast evaluate t2i: error: ") and expected in err and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == before  # no output folder, no temporaries


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["t2i", "--num-images", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowtok-fast evaluate t2i: error:") and "\n" not in err


def test_mjhq_per_category_fid_with_tar_shards(files, tmp_path):
    meta = {f"id{i}": {"prompt": f"a {cat} number {i}", "category": cat} for i, cat in enumerate(["animals", "people"] * 3)}
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    for j, cat in enumerate(["animals", "people"]):  # MJHQ's layout: one folder of real images per category
        (tmp_path / "mjhq" / cat).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(10 * j + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "mjhq" / cat / f"{i}.jpg")
    out = tmp_path / "eval"
    args = t2i_args(files, out, **{"--prompts": str(tmp_path / "meta_data.json"), "--reference": str(tmp_path / "mjhq"),
                                   "--num-images": "6", "--format": "tar", "--shard-size": "4", "--batch-size": "3"})
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    per = results["fid_per_category"]
    assert sorted(per) == ["animals", "people"] and all(v["images"] == 3 and np.isfinite(v["fid"]) for v in per.values())
    assert per["animals"]["fid"] != per["people"]["fid"]
    assert sorted(os.listdir(out / "images"))[:2] == ["run.json", "shard-00000.scores.npz"]
    assert (out / "images" / "shard-00001.tar").is_file()
    assert "7.68" in (out / "results.md").read_text()
