"""The benchmark scripts run on CPU: throughput (tiny, short) and the GPU suite's --help / --dry-run."""
import importlib.util
import json
import subprocess
import sys
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
    assert [r["benchmark"] for r in lines] == ["throughput", "train"]  # skipped modes are not written
    inf, train = lines
    assert inf["mode"] == "eager" and inf["images_per_s"] > 0 and 0 < inf["mfu"] < 1
    assert inf["flops_per_image"] > 0 and inf["ceiling_tflops"] > 0 and set(inf["stages_s"]) == set(tp.STAGES)
    assert train["samples_per_s"] > 0 and train["peak_mem_gib"] is None  # no allocator stats on CPU
    assert len(records) == 4


def test_gpu_suite_help_and_dry_run():
    for args in (["--help"], ["--dry-run"]):
        p = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    assert "TRITON_INTERPRET=0" in p.stdout and "throughput H" in p.stdout and "train H" in p.stdout


def test_gpu_suite_report_and_prediction(tmp_path):
    gs = _load("gpu_suite")
    env = {"device": "GPU", "torch": "2.11", "triton": "3.6", "commit": "abc", "time": "now"}
    thr = {"model": "XL", "mode": "graph", "batch": 64, "images_per_s": 120.0, "seconds_min": 0.5, "seconds_max": 0.6,
           "mfu": 0.4, "flow_mfu": 0.5, "peak_mem_gib": 20.0}
    train = {"model": "H", "policy": "none", "batch": 64, "predicted_peak_gib": 30.0, "prediction_error": 0.05,
             "record": {"samples_per_s": 100.0, "mfu": 0.45, "peak_mem_gib": 28.6}}
    md = gs.markdown({"environment": env, "steps": [{"name": "kernel tests", "rc": 0, "tail": "12 passed", "seconds": 3}],
                      "throughput": [thr], "train": [train, {"model": "XL", "policy": "none", "attempts": []}]})
    assert "| XL | graph | 120.0 |" in md and ">= 113: met" in md and "12 passed" in md and "+5.0%" in md
    pred = gs._train_prediction("tiny", "full", total_gib=4.0)
    assert pred["max_batch"] > 0 and pred["predicted"](8)["total"] < pred["predicted"](16)["total"]
