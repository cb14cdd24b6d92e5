"""Deployment packages (flowtok_fast/deploy): export -> load -> generate equals the eager pipeline,
the C++ runner writes the same images, and every refusal is a one-line UserError.

One package (tiny, batch 2, 3 steps, fp32, CPU: tests/conftest.py's tiny_package) is compiled once
per session: AOTInductor compiles C++ for each stage, ~1-2 CPU-minutes, most of this file's cost."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.deploy import export as export_mod
from flowtok_fast.deploy.export import export_package
from flowtok_fast.deploy.package_pipeline import PackagePipeline
from flowtok_fast.errors import UserError
from flowtok_fast.pipeline import FlowTokPipeline

from tests.conftest import run_cli
from tests.conftest import PACKAGE_BATCH as BATCH, PACKAGE_CFG as CFG, PACKAGE_STEPS as STEPS

PROMPTS = ["a red bicycle by a lake", "two cats"]


@pytest.fixture(scope="session")
def eager(flowing_tiny_pipeline):
    return flowing_tiny_pipeline


@pytest.fixture(scope="session")
def package(tiny_package):
    return tiny_package


@pytest.fixture(scope="session")
def loaded(package):
    return PackagePipeline.load(package)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_package_equals_eager(eager, loaded):
    want = eager(PROMPTS, steps=STEPS, cfg_scale=CFG, seed=5, output="tensor")
    got = loaded(PROMPTS, seed=5, output="tensor")
    assert got.shape == want.shape == (2, 3, 64, 64)
    assert want.std() > 0.01  # the random model's images are not constant: a comparison that can fail
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_package_stages_equal_eager(eager, loaded):
    """Stage by stage in latent space, where the tiny decoder's weak dependence on its input
    cannot hide a difference."""
    from flowtok_fast.models.text import tokenize
    from flowtok_fast.pipeline import SamplingOptions

    ids = tokenize(PROMPTS)
    noise = torch.randn((2, 77, 16), generator=torch.Generator().manual_seed(5))
    feats, z = loaded.text(ids, noise)
    feats_e = eager.encode_text(PROMPTS)
    z_e = eager.text_latents(feats_e, torch.Generator().manual_seed(5))  # draws the same noise
    torch.testing.assert_close(feats, feats_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, z_e, atol=1e-5, rtol=1e-5)
    x = loaded.flow(z)
    x_e = eager.flow(z_e, SamplingOptions(steps=STEPS, cfg_scale=CFG))
    assert (x_e - z_e).abs().max() > 0.1  # the flow moves the latents: its comparison can fail
    torch.testing.assert_close(x, x_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.decode_program(x, feats), eager.decode(x_e, feats_e), atol=1e-4, rtol=1e-4)
    _, other_seed = loaded.text(ids, torch.randn((2, 77, 16), generator=torch.Generator().manual_seed(6)))
    assert (other_seed - z).abs().max() > 0.1  # the noise input reaches the latents


def test_fewer_and_more_prompts_than_the_batch(eager, loaded):
    one = loaded(PROMPTS[:1], seed=1, output="tensor")
    torch.testing.assert_close(one, eager(PROMPTS[:1], steps=STEPS, cfg_scale=CFG, seed=1, output="tensor"),
                               atol=1e-4, rtol=1e-4)
    three = PROMPTS + ["a house"]
    got = loaded(three, seed=2, output="tensor")
    torch.testing.assert_close(got, eager(three, steps=STEPS, cfg_scale=CFG, seed=2, output="tensor"), atol=1e-4, rtol=1e-4)
    images = loaded(PROMPTS[:1], seed=1)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_manifest_records_the_build(package, eager):
    m = json.loads((package / "manifest.json").read_text())
    assert (m["batch"], m["steps"], m["cfg_scale"], m["dtype"], m["device"]) == (BATCH, STEPS, CFG, "fp32", "cpu")
    assert m["torch"] == torch.__version__ and m["model"]["name"] == "tiny"
    assert m["model"]["config"]["generator"]["width"] == eager.config.generator.width
    assert m["inputs"]["flow"]["x"] == [BATCH, 77, 16] and m["outputs"]["decode"]["images"] == [BATCH, 3, 64, 64]
    assert sorted(p.name for p in package.iterdir()) == ["decode.pt2", "flow.pt2", "manifest.json", "runner.txt", "text.pt2"]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw, words", [
    (dict(batch=4), "batch 2, expected 4"),
    (dict(dtype="bf16"), "dtype 'fp32', expected 'bf16'"),
    (dict(dtype=torch.bfloat16), "dtype 'fp32', expected 'bf16'"),
    (dict(device="cuda"), "device 'cpu', expected 'cuda'"),
])
def test_refuses_another_batch_dtype_device(package, kw, words):
    with pytest.raises(UserError) as e:
        PackagePipeline.load(package, **kw)
    assert words in one_line_error(e)


def test_refuses_another_model(package, eager):
    with pytest.raises(UserError) as e:
        PackagePipeline.load(package, model=FlowTokPipeline.random("tiny", seed=1, device="cpu"))
    assert "another model" in one_line_error(e)
    PackagePipeline.load(package, model=eager)  # its own model passes


def _copy(package: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    return copy


def _edit_manifest(pkg: Path, **changes) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    m.update(changes)
    (pkg / "manifest.json").write_text(json.dumps(m))


def test_refuses_another_torch(package, tmp_path):
    pkg = _copy(package, tmp_path)
    _edit_manifest(pkg, torch="2.0.0")
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "torch 2.0.0" in one_line_error(e) and torch.__version__ in str(e.value)


def test_refuses_damaged_packages(package, tmp_path):
    pkg = _copy(package, tmp_path)
    path = pkg / "decode.pt2"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "truncated" in one_line_error(e)

    path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])  # same size, one byte flipped
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "corrupted" in one_line_error(e)

    # a truncated file the manifest agrees with (hand-edited): the loader's own error, in one line
    path.write_bytes(data[: len(data) // 2])
    m = json.loads((pkg / "manifest.json").read_text())
    from flowtok_fast.deploy.manifest import file_sha256

    m["files"]["decode"].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "cannot be loaded" in one_line_error(e)

    (pkg / "flow.pt2").unlink()
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "flow.pt2 is missing" in one_line_error(e)


def test_refuses_missing_or_bad_manifest(package, tmp_path):
    pkg = _copy(package, tmp_path)
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "not valid JSON" in one_line_error(e)
    (pkg / "manifest.json").unlink()
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    assert "no manifest.json" in one_line_error(e)
    with pytest.raises(UserError) as e:
        PackagePipeline.load(tmp_path / "nowhere")
    assert "not a directory" in one_line_error(e)


def test_interrupted_export_leaves_nothing(eager, tmp_path, monkeypatch):
    calls = []

    def compile_then_interrupt(module, example, path, configs=None):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        path.write_bytes(b"compiled")

    monkeypatch.setattr(export_mod, "compile_stage", compile_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_package(eager, tmp_path / "pkg", BATCH, STEPS, CFG, progress=False)
    assert calls == ["text.pt2", "flow.pt2"]
    assert os.listdir(tmp_path) == []  # neither pkg/ nor the hidden temporary directory


def test_export_cli_checks_out_before_loading(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "x").write_text("")
    with pytest.raises(UserError) as e:
        export_mod.main(["--random-weights", "--batch", "1", "--out", str(tmp_path / "pkg")])
    assert "not empty" in one_line_error(e)


# ---------------------------------------------------------------- the C++ runner


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    """flowtok-run, built by CMake from the repository's CMakeLists.txt (~1 CPU-minute of g++)."""
    import subprocess
    import sys

    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the C++ runner needs {' and '.join(missing)} to build (not found on PATH)")
    root = Path(__file__).resolve().parents[1]
    build = tmp_path_factory.mktemp("runner-build")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(root), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    f"-DFLOWTOK_PYTHON={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "flowtok-run"], check=True, capture_output=True)
    return build / "flowtok-run"


def _run(runner, *args):
    import subprocess

    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True)


def test_runner_images_equal_the_python_packages(runner, package, tmp_path):
    from flowtok_fast.deploy.compare_runner import compare
    from flowtok_fast.deploy.tokenize_ids import seeded_noise, write_ids, write_noise
    from flowtok_fast.models.text import tokenize

    prompts = PROMPTS + ["a house"]  # 3 prompts, batch 2: one full batch and one padded
    write_ids(tmp_path / "ids.txt", tokenize(prompts))
    write_noise(tmp_path / "noise.bin", seeded_noise(len(prompts), seed=4))
    done = _run(runner, package, tmp_path / "ids.txt", tmp_path / "noise.bin", tmp_path / "images")
    assert done.returncode == 0, done.stderr
    assert compare(package, tmp_path / "ids.txt", tmp_path / "noise.bin", tmp_path / "images") == [0, 0, 0]


def test_runner_refuses_bad_input(runner, package, tmp_path):
    from flowtok_fast.deploy.tokenize_ids import seeded_noise, write_noise

    ids = tmp_path / "ids.txt"
    write_noise(tmp_path / "noise.bin", seeded_noise(1, seed=0))
    cases = [
        ("1 2 3\n", package, "ids.txt:1: 3 ids, expected 77"),
        ("49406 " + "x " * 76 + "\n", package, "'x' is not a CLIP token id"),
        (" ".join(["0"] * 77) + "\n", tmp_path / "nowhere", "nowhere: not a directory"),
        (" ".join(["0"] * 77) + "\n" + " ".join(["0"] * 77) + "\n", package, "noise for 1 prompt(s), the ids file has 2"),
    ]
    for text, pkg, words in cases:
        ids.write_text(text)
        done = _run(runner, pkg, ids, tmp_path / "noise.bin", tmp_path / "images")
        assert done.returncode == 2 and words in done.stderr and done.stderr.count("\n") == 1, (words, done.stderr)
    assert not (tmp_path / "images").exists()


def test_sampling_options_must_match_the_package(loaded):
    loaded.check_options(steps=STEPS, cfg_scale=CFG, method="euler", grid="reference", )
    loaded.check_options(steps=None)
    for kw, words in [(dict(steps=20), "steps 3, asked for 20"), (dict(cfg_scale=1.0), "cfg_scale 2.0, asked for 1.0"),
                      (dict(grid="consistent"), "grid 'reference'"), (dict(method="heun"), "method 'euler'"),
                      (dict(stpes=3), "unknown sampling option")]:
        with pytest.raises(UserError) as e:
            loaded(PROMPTS, **kw)
        assert words in one_line_error(e)


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_dtype_auto_is_fp32_on_every_cpu(monkeypatch, avx512_bf16, amx):
    from flowtok_fast.deploy.dtype import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    dtype, why = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "fp32" in why
    assert ("--dtype bf16 runs faster" in why) == (avx512_bf16 or amx)  # the printout says what bf16 would buy
    assert resolve_dtype("auto", "cuda")[0] == torch.bfloat16
    assert resolve_dtype("fp32", "cpu")[0] == torch.float32 and resolve_dtype("bf16", "cpu")[0] == torch.bfloat16
    with pytest.raises(UserError):
        resolve_dtype("fp16", "cpu")


def test_tokenize_writes_the_runners_inputs(eager, tmp_path):
    from flowtok_fast.deploy.compare_runner import read_ids
    from flowtok_fast.deploy.tokenize_ids import main, read_noise
    from flowtok_fast.models.text import tokenize

    assert main(["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "7", "--out", str(tmp_path / "ids.txt"),
                 "--noise-out", str(tmp_path / "noise.bin")]) == 0
    assert torch.equal(read_ids(tmp_path / "ids.txt"), tokenize(PROMPTS))
    # the noise FlowTokPipeline draws for seed 7 (TextVAE.sample on the pipeline's generator)
    want = torch.randn((2, 77, 16), generator=eager.generator_rng(7))
    assert torch.equal(read_noise(tmp_path / "noise.bin"), want)
    (tmp_path / "noise.bin").write_bytes(b"flowtok-noise 2 77 16\n" + b"\0" * 10)
    with pytest.raises(UserError) as e:
        read_noise(tmp_path / "noise.bin")
    assert "10 bytes of noise, expected 9856" in one_line_error(e)


def test_generate_from_package_equals_eager(eager, package, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, _, err = run_cli(["generate", "--package", str(package), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                         "--seed", "5", "--out", str(out), "--save-individual", "--threads", "1"], capsys)
    assert code == 0, err
    want = eager(PROMPTS, steps=STEPS, cfg_scale=CFG, seed=5)
    for i, image in enumerate(want):
        got = np.asarray(Image.open(tmp_path / f"grid_{i:03d}.png"), dtype=np.int16)
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("extra, needle", [(["--steps", "7"], "steps"), (["--random-weights"], "--random-weights"),
                                           (["--batch-size", "3"], "batch")])
def test_generate_package_refusals_are_one_line(package, tmp_path, capsys, extra, needle):
    code, _, err = run_cli(["generate", "--package", str(package), "--prompt", "a cat", "--out", str(tmp_path / "g.png"),
                         *extra], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("flowtok-fast generate: error: ") and needle in lines[0], lines[0]


# ---------------------------------------------------------------- benchmarks/throughput.py --modes package


def _throughput_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_package_mode_records(package, tmp_path, monkeypatch, capsys):
    """One JSONL record for the package mode, its export timed apart and its temporary package
    removed. The export is this session's package, copied (export_package is tested above): the
    benchmark's own part, load + timing of the three programs, runs for real."""
    from flowtok_fast.deploy import export

    tp = _throughput_module()
    made = []

    def copy_of_the_session_package(pipe, out, batch, steps, cfg, dtype=torch.float32, **kw):
        assert (pipe.config.name, batch, steps, cfg, dtype) == ("tiny", BATCH, STEPS, CFG, torch.float32)
        shutil.copytree(package, out)
        made.append(Path(out))
        return Path(out)

    monkeypatch.setattr(export, "export_package", copy_of_the_session_package)
    out = tmp_path / "r.jsonl"
    common = ["--model", "tiny", "--batch", str(BATCH), "--steps", str(STEPS), "--cfg", str(CFG), "--repeats", "1",
              "--train-batch", "0", "--ceiling-size", "256", "--results", str(out)]
    tp.main(common + ["--mode", "package"])
    assert "tiny package: export" in capsys.readouterr().out
    (r,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert (r["benchmark"], r["mode"], r["batch"], r["steps"], r["dtype"]) == ("throughput", "package", BATCH, STEPS,
                                                                                "float32")
    assert r["images_per_s"] > 0 and r["export_s"] >= 0 and r["load_s"] > 0 and r["package"] is None
    assert set(r["stages_s"]) == set(tp.STAGES) and r["stages_s"]["flow"] > 0 and r["stages_s"]["text_vae"] == 0
    assert len(made) == 1 and not made[0].exists()  # the temporary package is gone

    # an existing package is timed as it is; one built for other settings is refused, saying which
    out.unlink()
    tp.main(common + ["--mode", "package", "--package", str(package)])
    (r,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert r["export_s"] is None and r["package"] == str(package) and len(made) == 1
    with pytest.raises(UserError) as e:
        tp.main([*common, "--mode", "package", "--package", str(package), "--steps", "5"])
    assert "steps 3, asked for 5" in one_line_error(e)
