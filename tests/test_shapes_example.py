"""examples/shapes: the generator and grammar, the evaluator, the shards, and a smoke run of the chain."""
import json
import sys
import tarfile

import numpy as np
import pytest
import torch

from examples.shapes import data as D
from examples.shapes import evaluate as E

RES = 32


@pytest.fixture(scope="module")
def splits():
    return D.make_splits()


def test_grammar_round_trip_and_mirrors():
    caps = D.all_captions()
    assert len(caps) == len(set(caps)) == 15 + 15 * 15 * 4
    for cap in caps:
        p = D.parse_caption(cap)
        assert p.exact and D.caption_of(p.objects, p.relation) == cap
    assert D.caption_of([("red", "circle"), ("blue", "square")], "above") == "a red circle above a blue square"
    a, b = D.equivalent_captions("a red circle above a blue square")
    assert b == "a blue square below a red circle"
    assert D.parse_caption(a).ordered() == D.parse_caption(b).ordered()
    assert D.canonical_caption(b) == a and D.canonical_caption("a green triangle") == "a green triangle"
    loose = D.parse_caption("a red red circle left a blue square .")
    assert not loose.exact and loose.relation == "to the left of" and loose.ordered() == [("red", "circle"), ("blue", "square")]


def test_splits_are_deterministic_and_disjoint(splits):
    assert D.make_splits() == splits
    train, new, held = set(splits.train), set(splits.new), set(splits.held_out)
    assert not (train & new or train & held or new & held) and len(train | new | held) == len(D.all_captions())
    held_combos = set(splits.held_out_combos)
    assert all(not (set(D.layout_of(c)[1:]) & held_combos) for c in splits.train + splits.new)
    assert all(set(D.layout_of(c)[1:]) & held_combos for c in splits.held_out)
    # a new prompt's layout is new: neither it nor its mirror is in training
    train_layouts = {D.layout_of(c) for c in splits.train}
    assert all(D.layout_of(c) not in train_layouts for c in splits.new)
    assert {len(D.parse_caption(c).objects) for c in splits.new} == {2}


def test_generator_is_deterministic(splits):
    spec = D.DatasetSpec("t", splits.train, 12, seed=5, resolution=RES, backgrounds=("black", "grey"))
    a, b = D.generate(spec), D.generate(spec)
    assert [s.caption for s, _ in a] == [s.caption for s, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert a[0][1].shape == (RES, RES, 3) and a[0][1].dtype == np.uint8
    other = D.generate(D.DatasetSpec("t", splits.train, 12, seed=6, resolution=RES))
    assert [s.caption for s, _ in other] != [s.caption for s, _ in a]
    for scene, _ in a:  # boxes inside the image, two objects never overlap
        boxes = [o["box"] for o in scene.objects]
        assert all(0 <= v <= RES for box in boxes for v in box)
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_evaluator_on_ground_truth_is_near_perfect(splits):
    for name, caps in (("new", splits.new), ("held_out", splits.held_out), ("train", splits.train)):
        samples = D.generate(D.DatasetSpec(name, caps, 150, seed=11, resolution=RES, backgrounds=("black", "grey")))
        rates, _ = E.evaluate_images([im for _, im in samples], [s.caption for s, _ in samples])
        assert rates["colour_accuracy"] >= 0.99 and rates["shape_accuracy"] >= 0.98, (name, rates)
        assert rates["image_accuracy"] >= 0.97, (name, rates)


def test_evaluator_on_wrong_images_is_low(splits):
    samples = D.generate(D.DatasetSpec("w", splits.train, 120, seed=12, resolution=RES))
    nxt_c = {c: n for c, n in zip(D.PALETTE, list(D.PALETTE)[1:] + list(D.PALETTE)[:1])}
    nxt_s = {s: n for s, n in zip(D.SHAPES, D.SHAPES[1:] + D.SHAPES[:1])}
    wrong_colour, wrong_shape, blank = [], [], []
    for scene, _ in samples:
        k = range(len(scene.objects))
        wrong_colour.append(D.render(scene, RES, colours={i: nxt_c[scene.objects[i]["colour"]] for i in k}))
        wrong_shape.append(D.render(scene, RES, shapes={i: nxt_s[scene.objects[i]["shape"]] for i in k}))
        blank.append(np.full((RES, RES, 3), 12, np.uint8))
    caps = [s.caption for s, _ in samples]
    rc, _ = E.evaluate_images(wrong_colour, caps)
    assert rc["colour_accuracy"] <= 0.02 and rc["shape_accuracy"] >= 0.95  # only the colours are wrong
    rs, _ = E.evaluate_images(wrong_shape, caps)
    assert rs["shape_accuracy"] <= 0.05 and rs["colour_accuracy"] >= 0.98
    rb, _ = E.evaluate_images(blank, caps)
    assert rb["colour_accuracy"] == rb["shape_accuracy"] == rb["count_accuracy"] == 0.0
    noise = [np.random.default_rng(i).integers(0, 256, (RES, RES, 3), dtype=np.uint8) for i in range(40)]
    rn, _ = E.evaluate_images(noise, caps[:40])
    assert rn["image_accuracy"] <= 0.05


def test_caption_scoring():
    ref = "a red circle above a blue square"
    s = E.score_caption("a blue square below a red circle", ref)  # the mirror is the same scene
    assert s.colour_correct == s.shape_correct == 2 and s.all_correct and s.grammatical
    s = E.score_caption("a red triangle above a green square", ref)
    assert (s.colour_correct, s.shape_correct, s.both_correct, s.all_correct) == (1, 1, 0, False)
    s = E.score_caption("a red circle to the left of a blue square", ref)  # objects right, layout wrong
    assert s.both_correct == 2 and not s.all_correct
    s = E.score_caption("", "a green triangle")
    assert s.colour_correct == s.shape_correct == 0 and not s.grammatical
    rates, _ = E.evaluate_captions(["a green triangle", "a red circle"], ["a green triangle", "a red square"])
    assert rates["colour_accuracy"] == 1.0 and rates["shape_accuracy"] == 0.5 and rates["layout_accuracy"] == 0.5


@pytest.mark.parametrize("writer", ["webdataset", "tarfile"])
def test_shards_round_trip(tmp_path, splits, writer, monkeypatch):
    if writer == "webdataset":
        pytest.importorskip("webdataset")
    else:
        monkeypatch.setitem(sys.modules, "webdataset", None)  # import fails: the tarfile fallback
    samples = D.generate(D.DatasetSpec("s", splits.train, 7, seed=3, resolution=RES))
    info = D.write_shards(samples, tmp_path, "train", per_shard=3)
    assert info["writer"] == writer and info["count"] == 7 and len(info["shards"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with tarfile.open(info["shards"][0]) as tf:
        assert sorted(tf.getnames()) == sorted(f"train_{i:08d}.{e}" for i in range(3) for e in ("json", "png", "txt"))
    back = D.read_shards(info["shards"])
    assert [s.caption for s, _ in back] == [s.caption for s, _ in samples]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(back, samples))
    assert back[0][0].to_json() == samples[0][0].to_json()


def _smoke(out, *extra) -> dict:
    from examples.shapes.run import DEFAULT_CONFIG, main

    threads = torch.get_num_threads()
    try:
        assert main(["--config", str(DEFAULT_CONFIG.with_name("smoke.yaml")), "--out", str(out), *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text())


def test_smoke_run_of_the_whole_chain_twice_gives_the_same_digests(tmp_path, capsys):
    results = _smoke(tmp_path)
    # determinism that can be checked: a second run (another directory) gives the same digests
    # of the results and of every stage's final weights
    again = _smoke(tmp_path / "again")
    digests = results["digests"]
    assert set(digests) == {"results", "tokenizer", "latents", "text_autoencoder", "t2i", "i2t"}
    assert again["digests"] == digests
    printed = capsys.readouterr().out
    assert all(value in printed for value in digests.values())  # the run prints them
    # what was run, where, how loaded, how fast
    assert results["provenance"]["command"].endswith(f"--out {tmp_path}")
    assert results["provenance"]["commit"] is None or len(results["provenance"]["commit"]) == 40
    assert results["machine"]["torch_threads"] == 1 and len(results["machine"]["load_at_start"]) == 3
    assert {"tokenizer_train", "pretokenize", "text_autoencoder", "t2i_train", "t2i_sample", "i2t_train",
            "i2t_caption"} == set(results["throughput"])
    assert all(r["samples_per_s"] > 0 for r in results["throughput"].values())
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.size[0] == 8 * 32 * 4  # 8 columns of 32 px images at 4x
    gt = results["evaluator_on_ground_truth"]
    assert gt["new"]["image_accuracy"] == gt["held_out"]["image_accuracy"] == 1.0
    for split in ("new", "held_out"):
        t2i, i2t = results["t2i"]["eval"][split], results["i2t"]["eval"][split]
        assert {"colour_accuracy", "shape_accuracy", "decoded_without_text", "control_other_prompts_latents"} <= set(t2i)
        assert {"colour_accuracy", "shape_accuracy", "layout_accuracy"} <= set(i2t)
        assert "BLEU-4" in i2t or i2t.get("metric_notes")
    assert results["data"]["shards"]["train"]["count"] == 64
    assert set(results["timings"]["stages"]) == {"data", "tokenizer", "pretokenize", "text_autoencoder", "t2i_train",
                                                 "t2i_sample_eval", "i2t_train", "i2t_caption_eval"}
    # the exported tokenizer carries the fitted flow space, and the saved models keep it
    from flowtok_fast.train.tokenizer_trainer import load_exported

    tok = load_exported(tmp_path / "tokenizer" / "export")
    assert not tok.latent_norm.is_reference()
    for part in ("tokenizer/export/model.safetensors", "t2i/model/config.json", "i2t/model/config.json", "latents.pt",
                 "results.md"):
        assert (tmp_path / part).is_file(), part
    # the saved models load back through the package's own entry points
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline.from_pretrained(str(tmp_path / "t2i" / "model"), device="cpu")
    assert torch.equal(pipe.tokenizer.latent_norm.scale, tok.latent_norm.scale)
    assert pipe(["a red circle"], steps=2, output="tensor").shape == (1, 3, 32, 32)
    cap = FlowTokCaptioner.from_pretrained(str(tmp_path / "i2t" / "model"), device="cpu")
    assert len(cap(torch.rand(1, 3, 32, 32), steps=2)) == 1


def test_cli_verb_runs_the_example(capsys):
    from flowtok_fast.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["example", "shapes", "--help"])
    assert exit_info.value.code == 0
    assert "flowtok-fast example shapes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # an unknown example is an argparse error (code 2)
        cli_main(["example", "mnist"])
    assert exit_info.value.code == 2


def test_results_digest_ignores_time_and_place_but_not_a_metric():
    from examples.shapes.record import results_digest

    a = {"t2i": {"eval": {"new": {"colour_accuracy": 0.91}}, "samples_per_s_last": 230.0, "config": {"output_dir": "/a"}},
         "timings": {"total_s": 1.0}, "machine": {"load_at_start": [0.5]}, "out": "/a"}
    b = {"t2i": {"eval": {"new": {"colour_accuracy": 0.91}}, "samples_per_s_last": 120.0, "config": {"output_dir": "/b"}},
         "timings": {"total_s": 2.0}, "machine": {"load_at_start": [3.0]}, "out": "/b"}
    assert results_digest(a) == results_digest(b)
    b["t2i"]["eval"]["new"]["colour_accuracy"] = 0.9100001
    assert results_digest(a) != results_digest(b)


@pytest.mark.parametrize("override, named", [
    ("t2i.stesp=3", ["t2i.stesp", "'stesp'", "steps", "t_logit_loc"]),
    ("i2t.cfg_probb=0.1", ["i2t.cfg_probb", "cfg_prob"]),
    ("tokenizer.lrr=1e-3", ["tokenizer.lrr", "lr", "patch_size"]),
    ("sample.promts=4", ["sample.promts", "prompts", "cfg_scale"]),
    ("caption.imagse=4", ["caption.imagse", "images"]),
    ("data.train_sise=10", ["data.train_sise", "train_size"]),
    ("text_autoencoder.stpes=3", ["text_autoencoder.stpes", "steps"]),
    ("sede=1", ["'sede'", "seed"]),
    ("t2i.model=small", ["t2i.model", "set by the example"]),
    ("sample.steps=0", ["sample.steps=0", "integer >= 1"]),
    ("data.backgrounds=[pink]", ["data.backgrounds", "black, grey"]),
    ("tokenizer.steps=abc", ["section 'tokenizer'", "tokenizer.steps=abc", "steps"]),
    ("t2i.lr=-1", ["section 't2i'", "t2i.lr=-1", "lr"]),
    ("i2t.global_batch=128", ["i2t.global_batch", "data.train_size=64"]),
    ("t2isteps", ["t2isteps", "section.key=value"]),
])
def test_bad_overrides_fail_before_any_work(tmp_path, override, named):
    """Each stage's config is checked before the first stage runs: a UserError naming the key and
    what was expected (the known keys), and nothing written."""
    from examples.shapes.run import DEFAULT_CONFIG, main
    from flowtok_fast.errors import UserError

    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        main(["--config", str(DEFAULT_CONFIG.with_name("smoke.yaml")), "--out", str(out), override])
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in named), message
    assert not out.exists()


def test_good_overrides_are_normalised():
    from examples.shapes.config import load_config
    from examples.shapes.run import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, ["text_autoencoder.lr=1e-3", "t2i.lr=1e-3", "sample.compare_cfg_scales=[2]"])
    assert cfg["text_autoencoder"]["lr"] == 0.001 and cfg["sample"]["compare_cfg_scales"] == [2.0]


def test_cli_bad_override_is_one_line_exit_2(capsys):
    from flowtok_fast.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["example", "shapes", "--out", "/nonexistent/never", "t2i.stesp=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "t2i.stesp" in err and len(err.strip().splitlines()) == 1, err


def test_caption_explained_variance():
    from examples.shapes.evaluate import latent_statistics
    from flowtok_fast.models.latent_norm import LatentNorm

    g = torch.Generator().manual_seed(0)
    n = 4000
    caps = ["a red circle above a blue square", "a blue square below a red circle", "a green triangle"]
    label = torch.randint(3, (n,), generator=g)
    means = torch.where(label == 2, -1.0, 1.0)[:, None, None, None] + 0.5 * torch.randn(n, 16, 1, 77, generator=g)
    moments = torch.cat([means, torch.full_like(means, -2.0)], dim=1)
    stats = latent_statistics(moments, [caps[i] for i in label], LatentNorm())
    # a caption and its mirror are one scene: two groups at +-1 (share ~1/3 and 2/3), noise variance 0.25
    signal = 4 * (1 / 3) * (2 / 3)
    assert stats["captions"] == 2 and abs(stats["caption_explained_variance"] - signal / (signal + 0.25)) < 0.01
    assert abs(stats["posterior_noise_std"] - float(torch.exp(torch.tensor(-1.0)))) < 1e-6


def test_compare_names_the_first_stage_that_differs(tmp_path, capsys):
    from examples.shapes.compare import main as compare_main
    from flowtok_fast.errors import UserError

    digests = {"results": "r", "tokenizer": "t", "latents": "l", "text_autoencoder": "a", "t2i": "g", "i2t": "c"}
    for name, changed in (("a", {}), ("b", {}), ("c", {"t2i": "x", "results": "y"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"digests": {**digests, **changed}}))
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "all digests agree" in capsys.readouterr().out
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "first difference: t2i" in capsys.readouterr().out
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="results.json"):
        compare_main([str(tmp_path / "a"), str(tmp_path / "d")])


def test_a_direction_that_does_not_run_needs_no_section(tmp_path):
    import yaml

    from examples.shapes.config import load_config
    from examples.shapes.run import DEFAULT_CONFIG
    from flowtok_fast.errors import UserError

    cfg = yaml.safe_load(DEFAULT_CONFIG.with_name("smoke.yaml").read_text())
    del cfg["i2t"], cfg["caption"]
    path = tmp_path / "t2i_only.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert "i2t" not in load_config(path, [], ["t2i"])
    with pytest.raises(UserError, match="section '(caption|i2t)' is missing"):
        load_config(path, [])  # both directions: the i2t stage would need it
