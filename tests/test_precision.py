"""One precision rule whatever the CPU (flowtok_fast/deploy/dtype.py): --dtype auto is fp32 on every
CPU, bf16 on CUDA. Every path that could depend on the native-bf16 probe runs here under both of
its answers (the probe patched), so the suite passes the same on a CPU with avx512_bf16/AMX and on
one without."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.deploy import dtype as dt
from tests.conftest import run_cli
from tests.perf.test_benchmarks import _load
from tests.test_cli_errors import RANDOM


@pytest.fixture(params=[False, True], ids=["no-native-bf16", "native-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(dt, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_auto_is_fp32_on_every_cpu_and_bf16_on_cuda(native):
    dtype, why = dt.resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and ("this one has native bf16" in why) is native
    assert dt.resolve_dtype("auto", "cuda")[0] == torch.bfloat16
    assert dt.resolve_dtype("bf16", "cpu")[0] == torch.bfloat16  # opt-in


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "AVX512_CORE_VNNI", "SSE41"])
def test_a_onednn_cap_below_bf16_means_no_native_bf16(cap, monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 makes oneDNN emulate bf16 (how a CPU without native
    bf16 is rehearsed on one with it): the probe must say so, whatever this CPU has."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert dt.cpu_has_native_bf16() is False
    for uncapped in ("AVX512_CORE_BF16", "ALL", ""):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", uncapped)
        assert dt.cpu_has_native_bf16() is True


def test_api_and_generate_draw_the_same_image(native, tmp_path, capsys):
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline.random("tiny", device="cpu", flowing=True)  # what generate --random-weights loads
    assert pipe.dtype == torch.float32
    (api,) = pipe(["a cat"], steps=2, cfg_scale=2.0, seed=3)
    code, out, err = run_cli(["generate", *RANDOM, "--prompt", "a cat", "--steps", "2", "--cfg", "2", "--seed", "3",
                              "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    assert "dtype auto -> fp32" in out
    assert np.array_equal(np.asarray(api), np.asarray(Image.open(tmp_path / "g.png").convert("RGB")))


def test_throughput_mfu_divides_by_the_ceiling_of_the_dtype_that_ran(native, tmp_path):
    tp = _load("throughput")
    for dtype, inference in (("auto", "float32"), ("bf16", "bfloat16")):
        out = tmp_path / f"{dtype}.jsonl"
        tp.main(["--model", "tiny", "--batch", "1", "--steps", "1", "--repeats", "1", "--train-batch", "1",
                    "--modes", "eager", "--dtype", dtype, "--ceiling-size", "128", "--results", str(out)])
        inf, train = [json.loads(line) for line in out.read_text().splitlines()]
        assert inf["dtype"] == inference and inf["ceiling_matmul"].startswith(inference + " ")
        assert train["dtype"] == "float32" and train["ceiling_matmul"].startswith("float32 ")  # CPU training: fp32
