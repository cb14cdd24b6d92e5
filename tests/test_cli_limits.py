"""Issue 23's bad inputs: each is one line `flowtok-fast VERB: error: ...`, exit 2, before any model
is loaded or file written; the limits on steps, guidance, batch and images are one set
(validate.py), the server's too, and --help states them."""
import os

import pytest
import torch

from flowtok_fast import validate
from tests.conftest import run_cli
from tests.test_cli_errors import RANDOM, assert_one_line


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, names in os.walk(root) for n in dirs + names)


@pytest.fixture
def nothing_written(tmp_path, monkeypatch):
    """Runs in an empty folder and fails the test if anything appears in it."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert files_under(tmp_path) == []


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal must come first."""
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.pipeline import FlowTokPipeline

    def never(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    for cls in (FlowTokPipeline, FlowTokCaptioner):
        for name in ("random", "from_pretrained"):
            monkeypatch.setattr(cls, name, never)


EXPORT = ["export", *RANDOM, "--out", "pkg"]


@pytest.mark.parametrize("argv, verb, needles", [
    ([*EXPORT, "--batch", "2", "--threads", "-2"], "export", ["--threads", "an integer >= 1", "'-2'"]),
    ([*EXPORT, "--batch", "2", "--cfg", "nan"], "export", ["--cfg", "a finite number in [-100, 100]", "'nan'"]),
    ([*EXPORT, "--batch", "100000"], "export", ["--batch", "an integer in [1, 1024]", "'100000'"]),
    ([*EXPORT, "--batch", "2", "--steps", "1000000000"], "export", ["--steps", "an integer in [1, 500]"]),
    (["generate", *RANDOM, "--prompt", "x", "--steps", "1000000000"], "generate", ["--steps", "[1, 500]"]),
    (["generate", *RANDOM, "--prompt", "x", "--batch-size", "100000"], "generate", ["--batch-size", "[1, 1024]"]),
    (["generate", *RANDOM, "--prompt", "x", "--cfg", "1e9"], "generate", ["--cfg", "[-100, 100]"]),
    (["caption", "a.png", *RANDOM, "--steps", "501"], "caption", ["--steps", "[1, 500]"]),
    (["example", "shapes", "--images", "1000000"], "example shapes", ["--images", "an integer in [1, 1024]"]),
    (["example", "shapes", "--images", "3", "--threads", "0"], "example shapes", ["--threads", "an integer >= 1"]),
    (["example", "shapes", "--threads", "0"], "example shapes", ["--threads", "an integer >= 1"]),
])
def test_out_of_range_options(argv, verb, needles, capsys, nothing_written, no_model):
    code, _, err = run_cli(argv, capsys)
    assert_one_line(code, err, verb, *needles)


@pytest.mark.parametrize("extra, needle", [(["--steps", "0"], "--steps"), (["--cfg", "nan"], "--cfg"),
                                           (["--batch-size", "0"], "--batch-size"), (["--steps", "501"], "--steps"),
                                           (["--mode", "fastest"], "--mode")])
def test_evaluate_i2t_options_refused_before_anything_is_written(extra, needle, capsys, nothing_written, no_model):
    argv = ["evaluate", "i2t", "--model-dir", "m", "--karpathy", "k.json", "--images", "coco", "--out", "ev", *extra]
    code, _, err = run_cli(argv, capsys)
    assert_one_line(code, err, "evaluate i2t", needle)


def test_generate_refuses_more_prompts_than_one_grid_holds(tmp_path, capsys, no_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" * (validate.MAX_IMAGES + 1))
    code, _, err = run_cli(["generate", *RANDOM, "--prompt-file", str(prompts), "--out", str(tmp_path / "g.png")],
                           capsys)
    assert_one_line(code, err, "generate", f"{validate.MAX_IMAGES + 1} prompts", f"at most {validate.MAX_IMAGES}")
    assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]


def test_limits_are_the_servers_and_help_states_them(capsys):
    from flowtok_fast.serve import inputs

    assert (inputs.MAX_STEPS, inputs.MAX_ABS_CFG) == (validate.MAX_STEPS, validate.MAX_ABS_CFG)
    for argv in (["generate", "--help"], ["caption", "--help"], ["export", "--help"], ["evaluate", "i2t", "--help"]):
        code, out, _ = run_cli(argv, capsys)
        assert code == 0 and "--steps 1..500" in out and "--cfg -100..100" in out, argv
    code, out, _ = run_cli(["example", "shapes", "--help"], capsys)
    assert code == 0 and "--images 1..1024" in out


def test_tokenize_out_is_a_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ids").mkdir()
    code, _, err = run_cli(["tokenize", "--prompt", "a cat", "--out", "ids"], capsys)
    assert_one_line(code, err, "tokenize", "--out ids is a directory")
    assert ".tmp" not in err and files_under(tmp_path) == ["ids"]
    code, _, err = run_cli(["tokenize", "--prompt", "a cat", "--out", "a.ids", "--noise-out", "ids"], capsys)
    assert_one_line(code, err, "tokenize", "--noise-out ids is a directory")
    assert files_under(tmp_path) == ["ids"]


def test_plan_json_path_is_checked_before_the_plan(tmp_path, capsys, monkeypatch):
    from flowtok_fast.perf import planner

    def never(*a, **k):
        raise AssertionError("the plan was computed before --json was checked")

    monkeypatch.setattr(planner, "plan", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for target, needle in (("afile/under/plan.json", "is a file, not a directory"), ("adir", "is a directory")):
        code, out, err = run_cli(["plan", "--model", "tiny", "--gpu-mem", "80", "--json", target], capsys)
        assert_one_line(code, err, "plan", f"--json {target}", needle)
        assert out == ""
    assert files_under(tmp_path) == ["adir", "afile"]


def test_export_model_needs_force_to_replace_a_directory(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run_cli(["export-model", str(tmp_path / "no-run"), "--out", str(out)], capsys)
    assert_one_line(code, err, "export-model", f"--out {out} exists and holds a model", "--force")
    assert files_under(tmp_path) == ["model", "model/config.json"] and (out / "config.json").read_text() == "{}"
    code, _, err = run_cli(["export-model", str(tmp_path / "no-run"), "--out", str(out), "--force"], capsys)
    assert_one_line(code, err, "export-model", "no-run")  # past the --out check, to the (missing) checkpoint


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_train_of_an_empty_config(tmp_path, capsys, text):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(["train", str(cfg), f"output_dir={tmp_path / 'run'}"], capsys)
    assert_one_line(code, err, "train", str(cfg), "empty config")
    assert files_under(tmp_path) == ["empty.yaml"]


# ---------------------------------------------------------------- the Triton kernels on a machine without CUDA


@pytest.fixture
def no_cuda_no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_fused_kernels_without_cuda_are_refused_up_front(tmp_path, capsys, no_cuda_no_interpreter, no_model):
    cases = [(["train", "configs/train/tiny.yaml", "fused_kernels=true", f"output_dir={tmp_path / 'run'}"], "train",
              "fused_kernels=true needs CUDA"),
             (["train-tokenizer", "fused_kernels=true", f"output_dir={tmp_path / 'tok'}"], "train-tokenizer",
              "fused_kernels=true needs CUDA"),
             (["generate", *RANDOM, "--prompt", "x", "--fused-kernels", "--out", str(tmp_path / "g.png")], "generate",
              "--fused-kernels needs CUDA"),
             (["caption", str(tmp_path / "a.png"), *RANDOM, "--fused-kernels"], "caption", "--fused-kernels needs CUDA")]
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    for argv, verb, needle in cases:
        code, _, err = run_cli(argv, capsys)
        assert_one_line(code, err, verb, needle, "reference ops", "TRITON_INTERPRET=1")
    assert files_under(tmp_path) == ["a.png"]


def test_fused_kernels_run_on_a_cpu_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    validate.check_fused_kernels("cpu", "--fused-kernels")  # accepted: the kernels run in Triton's interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(validate.UserError, match="needs CUDA"):
        validate.check_fused_kernels("cpu", "--fused-kernels")
