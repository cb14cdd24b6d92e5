"""Bad input -> exit code 2 and one stderr line `flowtok-fast VERB: error: ...` naming the problem,
checked before any model is loaded or image sampled (issue 10). In-process calls to cli.main for
speed; a few subprocesses prove the real entry point (`python -m flowtok_fast`)."""
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast import cli
from flowtok_fast.errors import FlowTokWarning, UserError
from tests.conftest import run_cli

RANDOM = ["--random-weights", "--config", "tiny", "--device", "cpu"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


def assert_one_line(code, err, verb, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"flowtok-fast {verb}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------- files the tests make


def png_header(w: int, h: int) -> bytes:
    """A PNG with only IHDR + IEND: PIL reads its size without any pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def good_image(path, w=80, h=64):
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from flowtok_fast.pipeline import FlowTokPipeline

    d = tmp_path_factory.mktemp("model") / "tiny"
    FlowTokPipeline.random("tiny", device="cpu").save_pretrained(d)
    return d


def edited_copy(model_dir, tmp_path, edit_config=None, weights: bytes | None = None):
    """A copy of the tiny model directory with config.json (text or json edit) or the weights replaced."""
    d = tmp_path / "edited"
    d.mkdir()
    text = (model_dir / "config.json").read_text()
    if callable(edit_config):
        payload = json.loads(text)
        edit_config(payload)
        text = json.dumps(payload)
    elif isinstance(edit_config, str):
        text = edit_config
    (d / "config.json").write_text(text)
    (d / "model.safetensors").write_bytes(weights if weights is not None else (model_dir / "model.safetensors").read_bytes())
    return d


# ---------------------------------------------------------------- generate: options checked before any work


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--cfg", "nan"], "--cfg"),
    (["--cfg", "inf"], "--cfg"),
    (["--seed", "-1"], "--seed"),
    (["--steps", "two"], "--steps"),
    (["--threads", "0"], "--threads"),
])
def test_generate_option_ranges(extra, needle, capsys):
    code, _, err = run_cli(["generate", *RANDOM, "--prompt", "a cat", *extra], capsys)
    assert_one_line(code, err, "generate", f"argument {needle}", "expected")


def test_generate_out_problems_are_found_before_sampling(tmp_path, capsys, monkeypatch):
    from flowtok_fast.pipeline import FlowTokPipeline

    def never(*a, **k):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(FlowTokPipeline, "random", never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    cases = [
        (tmp_path / "grid.bogus", "unknown image extension '.bogus'"),
        (tmp_path / "grid", "unknown image extension '(none)'"),
        (tmp_path / "dir.png", "is a directory"),
        (tmp_path / "file" / "grid.png", "is a file, not a directory"),
        ("/proc/flowtok-test/grid.png", "cannot write in directory /proc"),
    ]
    for out, needle in cases:
        code, _, err = run_cli(["generate", *RANDOM, "--prompt", "a cat", "--out", str(out)], capsys)
        assert_one_line(code, err, "generate", "--out", needle)


@pytest.mark.parametrize("device, needle", [
    ("foo", "not a device string"),
    ("cuda:abc", "not a device string"),
    ("mps", "not supported"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this row is about a machine without CUDA")),
])
def test_device_strings(device, needle, capsys):
    argv = ["generate", "--random-weights", "--prompt", "a cat", "--device", device]
    code, _, err = run_cli(argv, capsys)
    assert_one_line(code, err, "generate", repr(device), needle)


def test_prompt_sources(tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a cat\x00\x00\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--prompt-file", str(binary)], [str(binary), "not UTF-8", "UTF-8 encoded"]),
        (["--prompt-file", str(nul)], [str(nul), "NUL bytes"]),
        (["--prompt-file", str(empty)], [str(empty), "no prompts"]),
        (["--prompt-file", str(tmp_path / "none.txt")], ["none.txt", "no such file"]),
        ([], ["--prompt"]),
    ]
    for extra, needles in cases:
        code, _, err = run_cli(["generate", *RANDOM, *extra], capsys)
        assert_one_line(code, err, "generate", *needles)


def test_weights_sources(tmp_path, capsys):
    cases = [
        (["--prompt", "x", "--device", "cpu"], "no weights given"),
        (["--prompt", "x", "--device", "cpu", "--checkpoint", "a.pth"], "must be given together"),
        (["--prompt", "x", "--random-weights", "--config", "Q", "--device", "cpu"], "unknown model 'Q'"),
        (["--prompt", "x", "--random-weights", "--config", "B", "--resolution", "300", "--device", "cpu"], "256 and 512"),
        (["--prompt", "x", "--model-dir", str(tmp_path), "--device", "cpu"], "not a flowtok-fast model directory"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(["generate", "--out", str(tmp_path / "g.png"), *extra], capsys)
        assert_one_line(code, err, "generate", needle)


# ---------------------------------------------------------------- model directories


def _set_heads(heads):
    def edit(payload):
        payload["config"]["generator"]["heads"] = heads
    return edit


def _add_key(payload):
    payload["config"]["generator"]["hidden"] = 3


def _drop_config(payload):
    payload["weights"] = payload.pop("config")


@pytest.mark.parametrize("edit, weights, needles", [
    ('{"config": {"generator": ', None, ["config.json in", "not valid JSON", "line 1 column"]),
    (_drop_config, None, ["no 'config' section"]),
    (_add_key, None, ["unknown key(s) in 'generator'", "hidden"]),
    (_set_heads(0), None, ["heads = 0", "integer >= 1"]),
    (_set_heads(5), None, ["heads = 5 must divide width = 96"]),
    (_set_heads(4), None, ["'generator.heads' is 4 but the weights were saved with 2"]),
    (None, (10**12).to_bytes(8, "little") + b"{}", ["model.safetensors", "header too large"]),
    (None, b"\x10\x00", ["model.safetensors", "not a readable safetensors file"]),
])
def test_broken_model_directories(model_dir, tmp_path, capsys, edit, weights, needles):
    d = edited_copy(model_dir, tmp_path, edit, weights)
    code, _, err = run_cli(["generate", "--model-dir", str(d), "--prompt", "x", "--device", "cpu",
                            "--out", str(tmp_path / "g.png")], capsys)
    assert_one_line(code, err, "generate", *needles)


def test_an_edited_config_is_refused_by_the_api_too(model_dir, tmp_path):
    from flowtok_fast.pipeline import FlowTokPipeline

    d = edited_copy(model_dir, tmp_path, _set_heads(4))
    with pytest.raises(UserError, match="generator.heads"):
        FlowTokPipeline.from_pretrained(d, device="cpu")


def test_convert_errors(tmp_path, capsys):
    import pickle

    class Payload:  # never unpickled: weights_only refuses it
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    (tmp_path / "out").write_text("x")
    base = ["convert", "--tokenizer", str(evil), "--clip", str(evil)]
    code, _, err = run_cli([*base, "--checkpoint", str(tmp_path / "no.pth"), "--out", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, "convert", "--checkpoint", "not found")
    code, _, err = run_cli([*base, "--checkpoint", str(evil), "--out", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, "convert", "evil.pth", "never unpickled")
    assert "weights_only" not in err
    code, _, err = run_cli([*base, "--checkpoint", str(evil), "--out", str(tmp_path / "out")], capsys)
    assert_one_line(code, err, "convert", "is a file")
    code, _, err = run_cli([*base, "--checkpoint", str(evil), "--out", str(tmp_path / "out" / "model")], capsys)
    assert_one_line(code, err, "convert", "is a file, not a directory")


# ---------------------------------------------------------------- caption: each bad image reported, the rest captioned


def bad_images(tmp_path):
    """(path, what the error must say) for every kind of unusable image file."""
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (tmp_path / "needle.png").write_bytes(png_header(1, 4_000_000))  # 74 bytes, 1 x 4,000,000
    Image.new("RGB", (1, 100_000)).save(tmp_path / "thin.png")
    good = good_image(tmp_path / "cut.png", 64, 64)
    data = open(good, "rb").read()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.png").mkdir()
    return [
        (tmp_path / "notes.txt", "not an image file"),
        (tmp_path / "zero.jpg", "empty file"),
        (tmp_path / "bomb.png", "decompression bomb"),
        (tmp_path / "needle.png", "aspect ratio 4000000:1"),
        (tmp_path / "thin.png", "aspect ratio 100000:1"),
        (tmp_path / "cut.png", "corrupt image data"),
        (tmp_path / "folder.png", "is a directory"),
        (tmp_path / "missing.png", "no such file"),
    ]


def test_each_bad_image_alone_is_one_line_and_exit_2(tmp_path, capsys):
    cases = bad_images(tmp_path)
    for path, needle in cases:
        code, out, err = run_cli(["caption", str(path), *RANDOM, "--steps", "1"], capsys)
        assert_one_line(code, err, "caption", f"{path}: ", needle)
        assert out == ""


def test_bad_images_are_reported_and_the_others_captioned(tmp_path, capsys):
    cases = bad_images(tmp_path)
    good = [good_image(tmp_path / "a.png"), good_image(tmp_path / "b.jpg", 64, 100)]
    argv = ["caption", good[0], *[str(p) for p, _ in cases], good[1], *RANDOM, "--steps", "1", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert [o["image"] for o in json.loads(out)] == good
    lines = error_lines(err)
    assert len(lines) == len(cases)
    for line, (path, needle) in zip(lines, cases):
        assert line.startswith(f"flowtok-fast caption: error: {path}: ") and needle in line
    assert f"{len(cases)} of {len(cases) + 2} image(s) could not be read" in err


@pytest.mark.parametrize("extra, needle", [
    (["--cfg", "nan"], "argument --cfg"),
    (["--steps", "0"], "argument --steps"),
    (["--batch-size", "0"], "argument --batch-size"),
])
def test_caption_option_ranges(tmp_path, capsys, extra, needle):
    code, _, err = run_cli(["caption", good_image(tmp_path / "a.png"), *RANDOM, *extra], capsys)
    assert_one_line(code, err, "caption", needle)


def test_caption_without_a_model_says_where_one_comes_from(tmp_path, capsys):
    code, _, err = run_cli(["caption", good_image(tmp_path / "a.png"), "--device", "cpu"], capsys)
    assert_one_line(code, err, "caption", "--model-dir", "export-model", "i2t")


# ---------------------------------------------------------------- eval-captions


def test_eval_captions_inputs(tmp_path, capsys):
    def js(name, content):
        p = tmp_path / name
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(p)

    preds = js("preds.json", {"1": "a cat"})
    cases = [
        (preds, js("r_str.json", {"1": "a cat on a mat"}), ["references['1'] is a string", "list of reference captions"]),
        (preds, js("r_ids.json", {"2": ["a cat"]}), ["same ids", "'1'", "'2'"]),
        (preds, js("r_bad.json", '{"1": ["a cat"'), ["references file", "r_bad.json", "not valid JSON", "line 1"]),
        (preds, js("r_num.json", {"1": [3]}), ["references['1']", "list of caption strings"]),
        (js("p_list.json", [{"img": 1}]), preds, ["p_list.json", "entry 0", "'image' and 'caption'"]),
        (js("p_num.json", {"1": 5}), js("r.json", {"1": ["a"]}), ["predictions['1']", "caption string"]),
        (str(tmp_path / "none.json"), preds, ["predictions file", "no such file"]),
    ]
    for p, r, needles in cases:
        code, _, err = run_cli(["eval-captions", p, r, "--no-spice", "--no-meteor"], capsys)
        assert_one_line(code, err, "eval-captions", *needles)


# ---------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def pipe():
    from flowtok_fast.pipeline import FlowTokPipeline

    return FlowTokPipeline.random("tiny", device="cpu")


@pytest.mark.parametrize("prompts, options, needle", [
    (["a cat"], dict(output="bogus"), "unknown output kind 'bogus': expected one of pil, tensor"),
    (["a cat"], dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (["a cat"], dict(cfg_scale=float("-inf")), "cfg_scale must be a finite number"),
    (["a cat"], dict(steps=0), "steps must be an integer >= 1"),
    (["a cat"], dict(steps=2.5), "steps must be an integer >= 1"),
    (["a cat"], dict(seed=-1), "seed must be an integer >= 0"),
    (["a cat"], dict(method="rk4"), "unknown sampler 'rk4'"),
    (["a cat"], dict(grid="log"), "unknown time grid 'log'"),
    (["a cat"], dict(stepz=3), "unknown sampling option(s) ['stepz']"),
    (["a cat", 7], {}, "prompt 1 is a int"),
    ([], {}, "no prompts given"),
    (None, {}, "prompts must be a string or a list of strings"),
])
def test_pipeline_checks_before_work(pipe, prompts, options, needle):
    with pytest.raises(UserError) as err:
        pipe(prompts, **options)
    assert needle in str(err.value)


def test_a_long_prompt_warns_that_it_was_truncated(pipe, tmp_path, capsys):
    long = "a red circle above a blue square " * 20
    with pytest.warns(FlowTokWarning, match="truncated to 77 tokens"):
        pipe([long, "a cat"], steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlowTokWarning)
        pipe(["a " * 75], steps=1)  # exactly 75 tokens between start and end: nothing lost, no warning
    # the CLI: a warning line, the image still made
    code, out, err = run_cli(["generate", *RANDOM, "--steps", "1", "--prompt", long, "--out", str(tmp_path / "g.png")],
                             capsys)
    assert code == 0 and (tmp_path / "g.png").is_file()
    warned = [line for line in err.splitlines() if line.startswith("flowtok-fast generate: warning: ")]
    assert len(warned) == 1 and "truncated to 77 tokens" in warned[0]


@pytest.fixture(scope="module")
def captioner():
    from flowtok_fast.captioning import FlowTokCaptioner

    return FlowTokCaptioner.random("tiny", device="cpu")


@pytest.mark.parametrize("pixels, needle", [
    (torch.rand(1, 3, 64, 64) * 255, "(0-255 values? divide by 255)"),
    ((torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), "got torch.uint8"),
    (torch.rand(1, 3, 32, 32), "shape [B, 3, 64, 64]"),
    (torch.rand(3, 64, 64), "shape [B, 3, 64, 64]"),
    (torch.full((1, 3, 64, 64), float("nan")), "NaN or inf"),
    (torch.rand(1, 3, 64, 64) - 0.5, "must be in [0, 1]"),
    ("photo.jpg", "got str"),
])
def test_captioner_checks_pixels(captioner, pixels, needle):
    with pytest.raises(UserError) as err:
        captioner(pixels, steps=1)
    assert needle in str(err.value)


def test_captioner_checks_files_and_options(captioner, tmp_path):
    with pytest.raises(UserError, match="cfg_scale must be a finite number"):
        captioner(torch.rand(1, 3, 64, 64), cfg_scale=float("nan"))
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 100_000)).save(thin)
    with pytest.raises(UserError, match="thin.png: .*aspect ratio"):
        captioner([good_image(tmp_path / "a.png"), str(thin)], steps=1)


def test_api_device_strings():
    from flowtok_fast.validate import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu0", "cuda:x"):
        with pytest.raises(UserError, match="not a device string"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ---------------------------------------------------------------- the boundary itself


def test_library_errors_that_escape_are_still_one_line_and_name_what_they_can(tmp_path):
    import yaml
    from safetensors import SafetensorError

    from flowtok_fast.cli_errors import describe

    bad = tmp_path / "recipe.yaml"
    bad.write_text("steps: [1, 2\nlr: 3\n")
    with open(bad) as f, pytest.raises(yaml.YAMLError) as yerr:
        yaml.safe_load(f)
    assert describe(yerr.value).startswith(f"invalid YAML: {bad}: line 2 column 3")
    try:
        open(tmp_path / "nope.txt")
    except OSError as e:
        assert describe(e) == f"{tmp_path / 'nope.txt'}: No such file or directory"
    assert describe(json.JSONDecodeError("Expecting value", "{x", 1)) == "invalid JSON: line 1 column 2: Expecting value"
    assert describe(SafetensorError("header too large")) == "invalid safetensors file: header too large"
    assert "never unpickles" in describe(__import__("pickle").UnpicklingError("Weights only load failed ... weights_only"))
    assert describe(ZeroDivisionError("division by zero")) is None  # a bug keeps its traceback


def test_passthrough_verbs_print_one_line(tmp_path, capsys):
    cases = [
        (["pretokenize", str(tmp_path), "--out", str(tmp_path / "o"), "--random-weights", "--batch-size", "0"],
         "pretokenize", "--batch-size"),
        (["pretokenize", str(tmp_path), "--out", str(tmp_path / "o"), "--random-weights", "--threads", "0"],
         "pretokenize", "--threads"),
        (["train-tokenizer", "--threads", "0"], "train-tokenizer", "--threads"),
        (["coco-karpathy", "--json", str(tmp_path / "x.json"), "--images", str(tmp_path), "--split", "train",
          "--out", str(tmp_path / "s")], "coco-karpathy", "does not exist"),
        (["train", str(tmp_path / "missing.yaml"), "--threads", "1"], "train", "missing.yaml"),
        (["export-model", str(tmp_path / "no-run"), "--out", str(tmp_path / "m")], "export-model", "no-run"),
        (["example", "shapes", "--config", str(tmp_path / "nope.yaml")], "example shapes", "nope.yaml"),
    ]
    (tmp_path / "bad.json").write_text("{")
    cases.append((["coco-karpathy", "--json", str(tmp_path / "bad.json"), "--images", str(tmp_path), "--split", "train",
                   "--out", str(tmp_path / "s")], "coco-karpathy", "not valid JSON"))
    for argv, verb, needle in cases:
        code, _, err = run_cli(argv, capsys)
        assert_one_line(code, err, verb, needle)


def test_debug_shows_the_traceback(capsys, monkeypatch):
    argv = ["generate", *RANDOM, "--prompt", "x", "--out", "grid.bogus"]
    with pytest.raises(UserError, match="unknown image extension"):
        cli.main([*argv, "--debug"])
    monkeypatch.setenv("FLOWTOK_DEBUG", "1")
    with pytest.raises(UserError, match="unknown image extension"):
        cli.main(argv)


def test_help_texts(capsys):
    code, out, _ = run_cli(["generate", "--help"], capsys)
    assert code == 0
    for default in ("the model's recommendation, else 20", "the model's recommendation, else 2.0", "(default: 0)",
                    "default: 16", "(default: outputs/grid.png)"):
        assert default in " ".join(out.split()), default
    code, out, _ = run_cli(["example", "--help"], capsys)
    assert code == 0 and "shapes" in out
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "export-model" in out and "--debug" in out
    assert cli.PASSTHROUGH["export-model"] == "flowtok_fast.train.export_model"
    code, _, err = run_cli(["nonsense"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err


# ---------------------------------------------------------------- the real entry point


def test_real_entry_point_one_line_and_debug_traceback(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FLOWTOK_DEBUG", None)
    base = [sys.executable, "-m", "flowtok_fast"]
    r = subprocess.run([*base, "generate", *RANDOM, "--prompt", "x", "--batch-size", "-1"], capture_output=True,
                       text=True, env=env)
    assert_one_line(r.returncode, r.stderr, "generate", "--batch-size")
    r = subprocess.run([*base, "caption", str(text), *RANDOM], capture_output=True, text=True, env=env)
    assert_one_line(r.returncode, r.stderr, "caption", str(text), "not an image file")
    r = subprocess.run([*base, "generate", *RANDOM, "--prompt", "x", "--out", str(tmp_path / "g.bogus")],
                       capture_output=True, text=True, env={**env, "FLOWTOK_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError: --out" in r.stderr
