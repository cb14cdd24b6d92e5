"""benchmarks/kernels.py: its byte and FLOP accounting against hand-computed values, and a smoke
run of every op at a tiny shape (the CPU reduced mode's code path)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from .utils import kernel_device

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# Shape 1: B=2 samples of N=3 tokens, D=4 features, fp32 (4 bytes). [B, N, D] = 24 elements,
# a per-sample [B, D] vector = 8.
SMALL = {"B": 2, "N": 3, "D": 4}
F32 = torch.float32


@pytest.mark.parametrize("op,fwd,fwd_bwd", [
    # inputs x, shift, scale = 24 + 8 + 8 elements; output 24. fwd: (40 + 24) * 4 = 256.
    # fwd+bwd: + output grad 96 + inputs again 160 + input grads 160.
    ("ln_modulate", 256, 256 + 96 + 160 + 160),
    # inputs x, y, gate = 24 + 24 + 8; output 24: fwd (56 + 24) * 4 = 320.
    ("gated_residual", 320, 320 + 96 + 224 + 224),
    # inputs x, y, gate, shift, scale = 72 elements; outputs res, mod = 48: fwd (72 + 48) * 4 = 480.
    ("gated_residual_ln_modulate", 480, 480 + 192 + 288 + 288),
])
def test_adaln_bytes(bench, op, fwd, fwd_bwd):
    op = bench.OPS[op]
    assert bench.traffic(op, SMALL, F32, "fwd") == fwd
    assert bench.traffic(op, SMALL, F32, "fwd+bwd") == fwd_bwd
    assert bench.flops(op, SMALL, "fwd") == 0  # elementwise: memory bound, no FLOPs claimed


def test_euler_bytes(bench):
    # In place: x [2, 3, 4] fp32 read (96 B) and written (96 B); v [4, 3, 4] bf16 read (96 B).
    shape = {"B": 2, "N": 3, "C": 4}
    assert bench.traffic(bench.OPS["cfg_euler_step_"], shape, torch.bfloat16, "fwd") == 96 + 96 + 96


def test_activation_bytes(bench):
    # swiglu: x12 [1, 2, 2*5] bf16 = 40 B in, out [1, 2, 5] = 20 B.
    sw = {"B": 1, "N": 2, "h": 5}
    assert bench.traffic(bench.OPS["swiglu"], sw, torch.bfloat16, "fwd") == 60
    assert bench.traffic(bench.OPS["swiglu"], sw, torch.bfloat16, "fwd+bwd") == 60 + 20 + 40 + 40
    # gelu: [2, 3, 4] fp32 = 96 B in and out.
    assert bench.traffic(bench.OPS["gelu_tanh"], {"B": 2, "N": 3, "F": 4}, F32, "fwd") == 192


def test_modulated_linear_bytes_and_flops(bench):
    # x, shift, scale (24 + 8 + 8) + weight 12x4 = 48 + bias 12: 100 elements = 400 B in;
    # output [2, 3, 12] = 72 elements = 288 B. FLOPs: 2 * (2*3 rows) * 4 * 12 = 576 forward.
    shape = {**SMALL, "K": 4, "O": 12}
    op = bench.OPS["modulated_linear"]
    assert op.modes == ("fwd+bwd",)
    assert bench.traffic(op, shape, F32, "fwd+bwd") == (400 + 288) + 288 + 400 + 400
    assert bench.flops(op, shape, "fwd") == 576
    assert bench.flops(op, shape, "fwd+bwd") == 3 * 576


# Shape 2: attention over qkv [B=1, N=4, 3, H=2, hd=8] bf16 = 192 elements = 384 B; output
# [1, 4, 16] = 128 B; RoPE tables [R=4, 8] fp32, 128 B each (read, never differentiated).
ATTN = {"B": 1, "N": 4, "H": 2, "hd": 8, "R": 4}


def test_attention_bytes_and_flops(bench):
    op, bf16 = bench.OPS["attention_rope"], torch.bfloat16
    assert bench.traffic(op, ATTN, bf16, "fwd") == 384 + 256 + 128
    # backward: dout 128 + qkv and tables again 640 + dqkv 384
    assert bench.traffic(op, ATTN, bf16, "fwd+bwd") == 768 + 128 + 640 + 384
    assert bench.traffic(bench.OPS["attention"], {**ATTN, "R": 0}, bf16, "fwd") == 384 + 128
    # 4 * B * H * N^2 * hd = 4 * 1 * 2 * 16 * 8; backward twice that
    assert bench.flops(op, ATTN, "fwd") == 1024
    assert bench.flops(op, ATTN, "fwd+bwd") == 3072


TINY = {
    "ln_modulate": {"B": 2, "N": 5, "D": 32},
    "gated_residual": {"B": 2, "N": 5, "D": 32},
    "gated_residual_ln_modulate": {"B": 2, "N": 5, "D": 32},
    "swiglu": {"B": 1, "N": 5, "h": 24},
    "gelu_tanh": {"B": 2, "N": 5, "F": 40},
    "cfg_euler_step_": {"B": 2, "N": 5, "C": 16},
    "attention": {"B": 1, "N": 9, "H": 1, "hd": 16, "R": 0},
    "attention_rope": {"B": 1, "N": 9, "H": 1, "hd": 16, "R": 4},
    "modulated_linear": {"B": 1, "N": 5, "D": 32, "K": 32, "O": 16},
    "gated_residual_modulated_linear": {"B": 1, "N": 5, "D": 32, "K": 32, "O": 16},
    "gelu_linear": {"B": 1, "N": 5, "K": 32, "O": 16},
    "swiglu_linear": {"B": 1, "N": 5, "K": 24, "O": 16},
}
CEILING = {"ceiling_gbps": 10.0, "ceiling_tflops": 0.1}


def test_every_op_has_a_tiny_shape(bench):
    assert set(TINY) == set(bench.OPS)


@pytest.mark.parametrize("name", list(TINY))
def test_smoke_every_op(bench, name):
    """Each op at a tiny shape on CPU: every implementation that can run here gives a record
    with ordered quantiles (torch.compile only for one op, to keep this fast)."""
    op = bench.OPS[name]
    impls = ("eager", "triton-interp", "sdpa") + (("compiled",) if name == "gated_residual" else ())
    for mode in op.modes:
        recs = bench.run_case(op, TINY[name], mode, torch.float32, torch.device("cpu"), CEILING,
                              impls=impls, cpu_budget_s=0.01)
        ran = {r["impl"] for r in recs}
        assert "eager" in ran
        if os.environ.get("TRITON_INTERPRET") == "1":
            assert "triton-interp" in ran
        if name.startswith("attention"):
            assert "sdpa" in ran
        for r in recs:
            assert "error" not in r, r
            assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
            assert r["bytes"] == bench.traffic(op, TINY[name], torch.float32, mode)
            assert r["gbps"] > 0 and (r["tflops"] is None) == (r["flops"] == 0)


def test_cli_writes_json_lines(bench, tmp_path, capsys):
    out = tmp_path / "k.jsonl"
    threads = torch.get_num_threads()
    try:
        bench.main(["--ops", "cfg_euler_step_", "--quick", "--jsonl", str(out)])
    finally:
        torch.set_num_threads(threads)  # the CPU mode runs single-threaded
    text = capsys.readouterr().out
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["impl"] for r in lines} >= {"eager", "compiled"}
    for r in lines:
        assert r["op"] == "cfg_euler_step_" and r["benchmark"] == "kernels"
        for key in ("device", "torch", "triton", "commit", "dtype", "p20_ms", "p50_ms", "p80_ms",
                    "gbps", "frac_bw", "ceiling_gbps", "ceiling_tflops"):
            assert key in r, key
    if not torch.cuda.is_available():
        assert bench.CPU_NOTE in text and all(r["cpu_reduced"] for r in lines)


@pytest.mark.parametrize("name", ["attention", "attention_rope", "swiglu_linear"])
def test_implementations_agree(bench, name):
    """The timed callables compute the same thing: in particular the attention baselines, given
    q and k rotated beforehand, match attention_ref with its RoPE. Runs where the kernels run:
    the CPU (interpreter) here, CUDA in the GPU suite (bf16 there: the flash baseline has no
    fp32)."""
    op, device = bench.OPS[name], kernel_device()
    cuda = device.type == "cuda"
    dtype, tol = (torch.bfloat16, 2e-2) if cuda else (torch.float32, 1e-4)
    impls = bench.implementations(op, op.make(TINY[name], dtype, device, False), device)
    want = impls.pop("eager")[0]()
    impls.pop("compiled")  # compiling is what the benchmark measures, not what this checks
    assert ("triton" if cuda else "triton-interp") in impls, sorted(impls)
    for impl, (fn, _) in impls.items():
        torch.testing.assert_close(fn(), want, rtol=tol, atol=tol / 10, msg=f"{impl} differs from the reference")


@pytest.mark.parametrize("name", list(TINY))
def test_a_gpu_machine_times_the_compiled_kernels(bench, name, monkeypatch):
    """On CUDA with TRITON_INTERPRET=0 every op gets a "triton" implementation (and attention
    the flash baseline); on a CPU without the interpreter none (the kernels cannot run there).
    Built on meta tensors: nothing runs, only the choice of implementations is checked."""
    op = bench.OPS[name]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = op.make(TINY[name], torch.bfloat16, "meta", False)
    on_gpu = bench.implementations(op, args, torch.device("cuda"))
    assert "triton" in on_gpu and "triton-interp" not in on_gpu
    if name.startswith("attention"):
        assert "sdpa-flash" in on_gpu
    on_cpu = bench.implementations(op, args, torch.device("cpu"))
    assert not {"triton", "triton-interp"} & set(on_cpu)


def test_each_case_is_on_disk_when_it_finishes(bench, tmp_path, monkeypatch):
    """A step killed mid-run keeps every finished case: the records of case 1 are in the file
    before case 2 starts (here case 2 fails instead of being killed)."""
    out = tmp_path / "k.jsonl"
    calls = []

    def fake_case(op, shape, mode, dtype, device, ceiling, **kw):
        calls.append(op.name)
        if len(calls) == 2:
            lines = out.read_text().splitlines()
            assert [json.loads(x)["op"] for x in lines] == ["swiglu"], lines
            raise KeyboardInterrupt  # stands in for the suite's timeout
        return [{"op": op.name, "mode": mode, "shape": shape, "impl": "eager", "p20_ms": 1.0, "p50_ms": 1.0,
                 "p80_ms": 1.0, "gbps": 1.0, "tflops": None, "frac_bw": 0.1, "frac_flops": None}]

    monkeypatch.setattr(bench, "run_case", fake_case)
    monkeypatch.setattr(bench, "measure_ceilings", lambda device, dtype: dict(CEILING, ceiling_copy="-", ceiling_matmul="-"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--ops", "swiglu", "gelu_tanh", "--jsonl", str(out)])
    finally:
        torch.set_num_threads(threads)
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec["op"] == "swiglu" and rec["benchmark"] == "kernels" and "case_s" in rec and "ceiling_gbps" in rec
