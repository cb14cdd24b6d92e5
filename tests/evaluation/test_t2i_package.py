"""`evaluate t2i --package`: an exported AOTInductor package makes image i the same as the eager
path's image i (per-image seeds, whatever the batching), its steps / cfg / batch come from the
package, and a conflicting option is a one-line error that leaves nothing behind.

The package is the session's (tests/conftest.py's tiny_package, shared with test_deploy.py: tiny,
batch 2, 3 steps, fp32, CPU), exported once: AOTInductor compiles C++ for each stage."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.evaluation import cli
from tests.evaluation.tiny_inception import save_tiny_inception

from tests.conftest import PACKAGE_BATCH as BATCH, PACKAGE_CFG as CFG, PACKAGE_STEPS as STEPS  # noqa: F401
from tests.conftest import flowing_tiny
NUM = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory, flowing_tiny_pipeline, tiny_package):
    root = tmp_path_factory.mktemp("t2i-package")
    flowing_tiny_pipeline.save_pretrained(str(root / "model"))  # the package's source model
    flowing_tiny(5).save_pretrained(str(root / "other-model"))
    (root / "ref").mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    # one prompt for every image: two images differ only through their seeds
    (root / "prompts.txt").write_text("\n".join(["a red bicycle by a lake"] * NUM))
    return {"root": root, "model": str(root / "model"), "other": str(root / "other-model"), "pkg": str(tiny_package),
            "inception": save_tiny_inception(root / "inception.pt"), "prompts": str(root / "prompts.txt"),
            "ref": str(root / "ref")}


def t2i_args(f, out, **over):
    args = {"--prompts": f["prompts"], "--reference": f["ref"], "--inception": f["inception"],
            "--num-images": str(NUM), "--out": str(out), "--shard-size": "3", "--seed": "4"}
    args.update(over)
    return ["t2i", "--no-progress"] + [x for k, v in args.items() if v is not None for x in (k, v)]


def pixels(out, i):
    return np.asarray(Image.open(out / "images" / f"shard-{i // 3:05d}" / f"{i:06d}.png"), np.int16)


def test_package_images_equal_eager_images(files, tmp_path):
    eager, packaged = tmp_path / "eager", tmp_path / "package"
    assert cli.main(t2i_args(files, eager, **{"--model-dir": files["model"], "--steps": str(STEPS), "--cfg": str(CFG),
                                               "--batch-size": "3"})) == 0
    # --model-dir beside --package: the package must come from that model (checked)
    assert cli.main(t2i_args(files, packaged, **{"--package": files["pkg"], "--model-dir": files["model"]})) == 0
    settings = json.loads((packaged / "results.json").read_text())["settings"]
    assert (settings["steps"], settings["cfg"], settings["batch_size"]) == (STEPS, CFG, BATCH)
    assert settings["package"] == os.path.abspath(files["pkg"]) and len(settings["package_weights_sha256"]) == 64 and settings["package_dtype"] == "fp32"
    for i in range(NUM):  # eager batches of 3 vs package batches of 2 (the last one padded)
        assert np.abs(pixels(eager, i) - pixels(packaged, i)).max() <= 1, f"image {i}"
    fid = [json.loads((d / "results.json").read_text())["fid"] for d in (eager, packaged)]
    assert fid[0] == pytest.approx(fid[1], rel=1e-3)


def test_package_gives_image_i_the_eager_image_i_in_latent_space(files):
    """The tiny decoder barely depends on its latents (other seeds move pixels by ~1e-4), so the
    per-image seeds are compared on the latents each path hands its decoder, where another seed
    moves them by far more than the tolerance."""
    from flowtok_fast.deploy.package_pipeline import PackagePipeline
    from flowtok_fast.evaluation.generation import package_images, pipeline_images
    from flowtok_fast.evaluation.shards import image_seed
    from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions

    eager_pipe, package = FlowTokPipeline.from_pretrained(files["model"]), PackagePipeline.load(files["pkg"])
    want, got = [], []
    decode = eager_pipe.decode
    eager_pipe.decode = lambda latents, feats: want.append(latents) or decode(latents, feats)
    decode_program = package.decode_program
    package.decode_program = lambda latents, feats: got.append(latents) or decode_program(latents, feats)

    prompts, seeds = ["a red bicycle by a lake"] * 3, [image_seed(4, i) for i in range(3)]
    eager_images = pipeline_images(eager_pipe, SamplingOptions(steps=STEPS, cfg_scale=CFG))(prompts, seeds)  # one batch of 3
    package_images(package)(prompts[:2], seeds[:2])
    package_images(package)(prompts[2:], seeds[2:])  # one prompt, padded to the package batch of 2
    want, got = want[0], torch.cat([got[0], got[1][:1]])
    assert len(eager_images) == 3 and (want[0] - want[1]).abs().max() > 0.1  # seeds reach the latents
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("over,expected", [  # both values named: the one asked for and the package's
    ({"--steps": "4"}, ("--steps 4: package", "built for steps 3")),
    ({"--cfg": "1.5"}, ("--cfg 1.5: package", "built for cfg_scale 2.0")),
    ({"--batch-size": "4"}, ("--batch-size 4: package", "built for batch 2")),
    ({"--mode": "compile"}, ("leave out --mode compile",)),
    ({"--model-dir": "OTHER"}, ("another model",)),
])
def test_conflicting_options_are_one_line_and_leave_nothing(files, tmp_path, capsys, over, expected):
    over = {k: files["other"] if v == "OTHER" else v for k, v in over.items()}
    out = tmp_path / "eval"
    assert cli.main(t2i_args(files, out, **{"--package": files["pkg"], **over})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowtok-fast evaluate t2i: error: ") and "\n" not in err, err
    assert all(words in err for words in expected), err
    assert not out.exists()


def test_neither_model_nor_package_is_one_line(files, tmp_path, capsys):
    assert cli.main(t2i_args(files, tmp_path / "eval")) == 2
    err = capsys.readouterr().err.strip()
    assert "give --model-dir" in err and "--package" in err and "\n" not in err
