"""The throughput benchmark runs on CPU (tiny, short); the GPU suite is tested in test_gpu_suite.py."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_tiny_records(tmp_path, capsys):
    tp = _load("throughput")
    out = tmp_path / "r.jsonl"
    records = tp.main(["--model", "tiny", "--batch", "1", "--steps", "2", "--repeats", "1", "--train-batch", "1",
                       "--modes", "eager", "fused", "graph", "--ceiling-size", "256", "--results", str(out)])
    text = capsys.readouterr().out
    assert "skipped tiny fused: Triton kernels need CUDA" in text
    assert "CUDA graphs need CUDA" in text
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    # written in order as each finished, the skipped ones with their reason
    assert [(r["benchmark"], r.get("mode")) for r in lines] == [("throughput", "eager"), ("skipped", "fused"),
                                                               ("skipped", "graph"), ("train", None)]
    assert "CUDA graphs need CUDA" in lines[2]["reason"]
    inf, train = lines[0], lines[3]
    assert inf["ceiling_copy_gbps"] > 0
    assert inf["mode"] == "eager" and inf["images_per_s"] > 0 and 0 < inf["mfu"] < 1
    assert inf["flops_per_image"] > 0 and inf["ceiling_tflops"] > 0 and set(inf["stages_s"]) == set(tp.STAGES)
    assert train["samples_per_s"] > 0 and train["peak_mem_gib"] is None  # no allocator stats on CPU
    assert len(records) == 4


def test_student_line_says_what_flops_allow(tmp_path, capsys):
    """The student-vs-teacher line carries the arithmetic limit: the decoder and CLIP are the same
    network in both, so their FLOPs bound the speed-up whatever the flow costs."""
    from flowtok_fast.perf import flops

    tp = _load("throughput")
    tp.main(["--model", "tiny", "--batch", "1", "--steps", "4", "--cfg", "2.0", "--repeats", "1", "--train-batch", "0",
             "--modes", "eager", "--student-steps", "1", "--ceiling-size", "256", "--results", str(tmp_path / "r.jsonl")])
    teacher, student = flops.end_to_end("tiny", 4, 2.0), flops.end_to_end("tiny", 1, 1.0)
    limit = teacher["total"] / student["total"]
    free = teacher["total"] / (student["total"] - student["flow"])
    assert free > limit > 1
    assert f"FLOPs per image allow x{limit:.1f} (x{free:.1f} with a free flow)" in capsys.readouterr().out


def test_throughput_needs_no_bpe_tokenizer():
    """The CLIP stage runs on token ids: shaped like the tokenizer's output, in the vocabulary."""
    tp = _load("throughput")
    ids = tp.token_ids(3)
    assert ids.shape == (3, 77) and ids.dtype.is_floating_point is False
    assert (ids[:, 0] == 49406).all() and (ids[:, 21] == 49407).all() and (ids[:, 22:] == 0).all()
    assert int(ids.max()) < 49408


def test_load_warning_once(monkeypatch, capsys):
    tp = _load("throughput")
    monkeypatch.setattr(tp.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(tp.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    state = {}
    tp.load_warning(state)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(tp.os, "getloadavg", lambda: (5.2, 3.0, 1.0))
    tp.load_warning(state)
    tp.load_warning(state)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: load average 5.2 exceeds the 2 cores")
