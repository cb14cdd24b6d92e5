"""Per-op kernel benchmark: each Triton kernel against its eager PyTorch reference (the `*_ref`
beside it in kernels/, imported, not re-written) and torch.compile of that reference; attention
also against PyTorch SDPA (flash backend on CUDA) and flash-attn / xformers when importable, all
three given q and k already rotated (RoPE done outside the timed call).

    python benchmarks/kernels.py                                   # GPU: every op, real shapes
    python benchmarks/kernels.py --quick --ops attention swiglu    # one shape per op
    python benchmarks/kernels.py                                   # CPU: the reduced mode below

Shapes (GPU): generator ops at B in {64, 128, 1024} samples, N 77 tokens, D in {768, 1024,
1152, 1280} (heads 12/16/16/20: hd 64, or 72 at D 1152). A forward-only run is sampling with
CFG, so it sees 2B rows; forward+backward is training, B rows. Tokenizer-decoder ops (SwiGLU h
2730, RoPE attention over R = g*g of N = g*g + 154 tokens) at N 410 / 1178 (256 / 512 px), B 64
and 128. The fused_linear composites (elementwise op + the Linear after it) run forward+backward
only: what they change is training memory and the backward recompute.

Accounting, one number per (op, shape, mode) credited to every implementation, so GB/s and
TFLOP/s just restate time:
  bytes, forward           every input read once, every output written once
  bytes, forward+backward  that, plus a backward that reads every input and every output
                           gradient once and writes every input gradient once
  FLOPs                    matmuls only (2 per multiply-add): attention 4*B*H*N^2*hd, a Linear
                           2*M*K*O; backward counted as twice the forward (model FLOPs, no
                           recomputation). Elementwise ops have none: they are memory bound.
Ceilings are measured on the device: bandwidth from a large device-to-device copy (bytes read +
written), FLOP/s from a large matmul in the benchmark dtype.

GPU timing: triton.testing.do_bench (L2 flushed before each run, gradients reset), p20/p50/p80;
torch.compile is static and fresh per shape, its compile time is not timed. Each case's records
are appended to --jsonl the moment the case finishes (a timeout loses only the case in flight);
--quick is the GPU suite's mode: one shape per op, attention at N 77 / 410 and hd 72 / 64 (plain,
so SDPA-flash takes the same problem) plus the decoder's RoPE case. Without CUDA the
script runs a reduced mode: small shapes, one thread, medians of time.perf_counter, the Triton
kernels once each in the interpreter (a smoke run, not a timing); small tensors stay in cache,
so the copy-bandwidth fraction can pass 100% there. A table is printed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton runs on the CPU only in its interpreter, chosen when the kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from flowtok_fast.kernels import adaln, attention, flow_step, fused_linear, swiglu  # noqa: E402
from flowtok_fast.models.rope import rope_2d_tables  # noqa: E402

CPU_NOTE = ("CPU reduced mode: Triton interpreter is not representative; "
            "only reference vs compiled-reference timings are meaningful")
QUANTILES = (0.2, 0.5, 0.8)
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# Ops: how to build inputs at a shape, which implementations to time, the FLOP formula
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    name: str
    make: Callable  # (shape dict, dtype, device, grad) -> list of args
    ref: Callable  # the eager reference: ref(*args)
    kernel: Callable  # the Triton implementation, same signature
    shapes: Callable  # (scale: "full" | "quick" | "cpu", mode) -> list of shape dicts
    flops: Callable = lambda s: 0  # forward matmul FLOPs at shape s
    modes: tuple = MODES


def _randn(shape, dtype, device, grad, scale=1.0):
    return (torch.randn(shape, device=device, dtype=dtype) * scale).requires_grad_(grad)


def _linear(k, o, dtype, device, grad):
    lin = torch.nn.Linear(k, o, device=device, dtype=dtype)
    return lin.requires_grad_(grad)


# Sizes. Generator widths and their heads (hd 64, 72 at XL); the decoder: width 1024, 16 heads.
_GEN_D = (768, 1024, 1152, 1280)
_HEADS = {768: 12, 1024: 16, 1152: 16, 1280: 20}
_SAMPLES = (64, 128, 1024)
_DEC_N = (410, 1178)  # g*g + 154 at 256 / 512 px
_DEC_B = (64, 128)


def _rows(b, mode):
    """Generator rows: sampling (forward only) runs the CFG-doubled batch, training runs B."""
    return 2 * b if mode == "fwd" else b


def _gen_shapes(scale, mode, make_shape):
    """make_shape(B rows, N, D) at the generator sizes of `scale`."""
    if scale == "cpu":  # one sample at the S width
        return [make_shape(_rows(1, mode), 77, 384)]
    pairs = [(64, 1152)] if scale == "quick" else [(b, d) for d in _GEN_D for b in _SAMPLES]
    return [make_shape(_rows(b, mode), 77, d) for b, d in pairs]


def _dec_shapes(scale, make_shape):
    """make_shape(B, N) at the tokenizer decoder's sizes of `scale`."""
    if scale == "cpu":
        return [make_shape(1, 4 + 154)]  # a 2x2 patch grid
    pairs = [(64, 410)] if scale == "quick" else [(b, n) for n in _DEC_N for b in _DEC_B]
    return [make_shape(b, n) for b, n in pairs]


def _adaln_shapes(scale, mode):
    return _gen_shapes(scale, mode, lambda b, n, d: {"B": b, "N": n, "D": d})


def _make_ln(s, dt, dev, g):
    B, N, D = s["B"], s["N"], s["D"]
    return [_randn((B, N, D), dt, dev, g), _randn((B, D), dt, dev, g, 0.5), _randn((B, D), dt, dev, g, 0.5)]


def _make_gr(s, dt, dev, g):
    B, N, D = s["B"], s["N"], s["D"]
    return [_randn((B, N, D), dt, dev, g), _randn((B, N, D), dt, dev, g), _randn((B, D), dt, dev, g, 0.5)]


def _make_grln(s, dt, dev, g):
    return _make_gr(s, dt, dev, g) + _make_ln(s, dt, dev, g)[1:]


def _make_euler(s, dt, dev, g):
    # The sampler's state stays fp32; the velocity is the model output (benchmark dtype).
    B, N, C = s["B"], s["N"], s["C"]
    return [torch.randn(B, N, C, device=dev), torch.randn(2 * B, N, C, device=dev, dtype=dt), 0.05, 2.0]


def _make_attention(s, dt, dev, g):
    B, N, H, hd, R = s["B"], s["N"], s["H"], s["hd"], s["R"]
    qkv = _randn((B, N, 3, H, hd), dt, dev, g)
    if not R:
        return [qkv, None, None]
    cos, sin = rope_2d_tables(int(R ** 0.5), hd)
    return [qkv, cos.to(dev), sin.to(dev)]


def _attn_gen_shapes(scale, mode):
    if scale == "cpu":
        return [{"B": _rows(1, mode), "N": 77, "H": 2, "hd": 72, "R": 0}]
    if scale == "quick":  # against SDPA (flash) at both sequence lengths and both head dims
        return [{"B": _rows(64, mode), "N": n, "H": h, "hd": hd, "R": 0}
                for n in (77, 410) for h, hd in ((16, 72), (20, 64))]
    return [{"B": _rows(b, mode), "N": n, "H": _HEADS[d], "hd": d // _HEADS[d], "R": 0}
            for d in (1152, 1280) for n in (77, 154) for b in _SAMPLES]


def _attn_dec_shapes(scale, mode):
    H = 2 if scale == "cpu" else 16
    return _dec_shapes(scale, lambda b, n: {"B": b, "N": n, "H": H, "hd": 64, "R": n - 154})


def _attn_flops(s):
    return 4 * s["B"] * s["H"] * s["N"] ** 2 * s["hd"]


def _lin_flops(s):
    return 2 * s["B"] * s["N"] * s["K"] * s["O"]


def _composite(name, ref, kernel, make_in, shapes):
    """A fused_linear composite: make_in(shape, ...) gives the elementwise op's inputs; the Linear
    maps K -> O features."""
    def make(s, dt, dev, g):
        return make_in(s, dt, dev, g) + [_linear(s["K"], s["O"], dt, dev, g)]
    return Op(name, make, ref, kernel, shapes, flops=_lin_flops, modes=("fwd+bwd",))


def _gen_linear_shapes(k_of, o_of):
    return lambda scale, mode: _gen_shapes(scale, mode, lambda b, n, d: {"B": b, "N": n, "D": d, "K": k_of(d),
                                                                         "O": o_of(d)})


OPS = {op.name: op for op in [
    Op("ln_modulate", _make_ln, adaln.ln_modulate_ref, adaln.ln_modulate, _adaln_shapes),
    Op("gated_residual", _make_gr, adaln.gated_residual_ref, adaln.gated_residual, _adaln_shapes),
    Op("gated_residual_ln_modulate", _make_grln, adaln.gated_residual_ln_modulate_ref,
       adaln.gated_residual_ln_modulate, _adaln_shapes),
    Op("swiglu", lambda s, dt, dev, g: [_randn((s["B"], s["N"], 2 * s["h"]), dt, dev, g)],
       swiglu.swiglu_ref, swiglu.swiglu,
       lambda scale, mode: _dec_shapes(scale, lambda b, n: {"B": b, "N": n, "h": 2730})),
    Op("gelu_tanh", lambda s, dt, dev, g: [_randn((s["B"], s["N"], s["F"]), dt, dev, g)],
       swiglu.gelu_tanh_ref, swiglu.gelu_tanh,
       lambda scale, mode: _gen_shapes(scale, mode, lambda b, n, d: {"B": b, "N": n, "F": 4 * d})),
    Op("cfg_euler_step_", _make_euler, flow_step.cfg_euler_step_ref, flow_step.cfg_euler_step_,
       lambda scale, mode: [{"B": b, "N": 77, "C": 16} for b in
                            {"cpu": (2,), "quick": (64,), "full": _SAMPLES}[scale]], modes=("fwd",)),
    Op("attention", _make_attention, attention.attention_ref, attention.attention, _attn_gen_shapes,
       flops=_attn_flops),
    Op("attention_rope", _make_attention, attention.attention_ref, attention.attention, _attn_dec_shapes,
       flops=_attn_flops),
    # Generator: norm1 + modulate -> qkv (D -> 3D); residual + norm2 + modulate -> fc1 (D -> 4D);
    # GELU -> fc2 (4D -> D). Decoder: SwiGLU -> w3 (h 2730 -> 1024).
    _composite("modulated_linear", fused_linear.modulated_linear_ref, fused_linear.modulated_linear,
               _make_ln, _gen_linear_shapes(lambda d: d, lambda d: 3 * d)),
    _composite("gated_residual_modulated_linear", fused_linear.gated_residual_modulated_linear_ref,
               fused_linear.gated_residual_modulated_linear, _make_grln,
               _gen_linear_shapes(lambda d: d, lambda d: 4 * d)),
    _composite("gelu_linear", fused_linear.gelu_linear_ref, fused_linear.gelu_linear,
               lambda s, dt, dev, g: [_randn((s["B"], s["N"], s["K"]), dt, dev, g)],
               _gen_linear_shapes(lambda d: 4 * d, lambda d: d)),
    _composite("swiglu_linear", fused_linear.swiglu_linear_ref, fused_linear.swiglu_linear,
               lambda s, dt, dev, g: [_randn((s["B"], s["N"], 2 * s["K"]), dt, dev, g)],
               lambda scale, mode: _dec_shapes(scale, lambda b, n: {"B": b, "N": n, "K": 2730, "O": 1024})),
]}


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------
def _tensors(args) -> list:
    """The tensors among an op's args, Linear parameters included."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, torch.nn.Module):
            out.extend(a.parameters())
    return out


def _outputs(result) -> list:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def traffic(op: Op, shape: dict, dtype: torch.dtype, mode: str) -> int:
    """Minimal bytes moved (see the module docstring). Input and output sizes come from running
    the reference on meta tensors: the same shapes the benchmark times, no memory used."""
    args = op.make(shape, dtype, "meta", mode == "fwd+bwd")
    ins, outs = _tensors(args), _outputs(op.ref(*args))
    fwd = _nbytes(ins) + _nbytes(outs)
    if mode == "fwd":
        return fwd
    return fwd + _nbytes(outs) + _nbytes(ins) + _nbytes(t for t in ins if t.requires_grad)


def flops(op: Op, shape: dict, mode: str) -> int:
    f = op.flops(shape)
    return f if mode == "fwd" else 3 * f  # backward = 2x forward


# --------------------------------------------------------------------------------------------
# Implementations and timing
# --------------------------------------------------------------------------------------------
def _rotated_qkv(qkv, cos, sin):
    """qkv with RoPE applied to q and k of the first R tokens (for the baselines that have no
    RoPE): a new leaf, built outside the timed call."""
    qkv = qkv.detach()
    if cos is not None:
        R = cos.shape[0]
        rot = attention.apply_rope_ref(qkv[:, :R, :2].transpose(1, 3), cos, sin).transpose(1, 3)
        qkv = qkv.clone()
        qkv[:, :R, :2] = rot
    return qkv.contiguous()


def _attention_baselines(device) -> dict:
    """name -> fn(qkv_rotated [B, N, 3, H, hd]) -> [B, N, H*hd]; only what is importable here."""
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731  (fails, not falls back)
    else:
        backend = contextlib.nullcontext

    def sdpa(qkv):
        B, N, _, H, hd = qkv.shape
        q, k, v = qkv.transpose(1, 3).unbind(2)  # [B, H, N, hd] views, as attention_ref takes them
        with backend():
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, H * hd)

    impls = {"sdpa-flash" if device.type == "cuda" else "sdpa": sdpa}
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_qkvpacked_func  # takes our packed layout as is
            impls["flash-attn"] = lambda qkv: flash_attn_qkvpacked_func(qkv).flatten(-2)
        except ImportError:
            pass
        try:
            import xformers.ops as xops
            impls["xformers"] = lambda qkv: xops.memory_efficient_attention(*qkv.unbind(2)).flatten(-2)
        except ImportError:
            pass
    return impls


def implementations(op: Op, args: list, device: torch.device) -> dict:
    """impl name -> (zero-argument callable, the leaves whose .grad it fills)."""
    cpu = device.type != "cuda"
    leaves = [t for t in _tensors(args) if t.requires_grad]
    compiled = torch.compile(op.ref, dynamic=False)
    impls = {"eager": (lambda: op.ref(*args), leaves), "compiled": (lambda: compiled(*args), leaves)}
    if not cpu or os.environ.get("TRITON_INTERPRET") == "1":  # else the kernels cannot run here
        impls["triton-interp" if cpu else "triton"] = (lambda: op.kernel(*args), leaves)
    if op.name.startswith("attention"):
        qkv_rot = _rotated_qkv(*args).requires_grad_(args[0].requires_grad)
        for name, fn in _attention_baselines(device).items():
            impls[name] = ((lambda fn=fn: fn(qkv_rot)), [qkv_rot] if qkv_rot.requires_grad else [])
    return impls


def _with_backward(fn, grads):
    def step():
        torch.autograd.backward(_outputs(fn()), grads)
    return step


def time_gpu(fn, leaves) -> list[float]:
    return triton.testing.do_bench(fn, grad_to_none=leaves or None, quantiles=list(QUANTILES))


def time_cpu(fn, leaves, budget_s: float = 0.5, min_reps: int = 3, max_reps: int = 30,
             warmup: bool = True) -> list[float]:
    """p20/p50/p80 in ms over repeats filling about budget_s (at least min_reps)."""
    if warmup:
        fn()  # compiles
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < deadline):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def run_case(op: Op, shape: dict, mode: str, dtype: torch.dtype, device: torch.device, ceiling: dict,
             impls: tuple | None = None, cpu_budget_s: float = 0.5) -> list[dict]:
    """Times every implementation of `op` at one shape; one record per implementation (with an
    "error" instead of times where one cannot run)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # fresh, static compile per shape; keeps dynamo's recompile limit away
    nbytes, nflops = traffic(op, shape, dtype, mode), flops(op, shape, mode)
    try:
        args = op.make(shape, dtype, device, mode == "fwd+bwd")
        grads = [torch.randn_like(o) for o in _outputs(op.ref(*args))] if mode == "fwd+bwd" else None
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return [{"op": op.name, "mode": mode, "shape": shape, "impl": "-", "error": "out of memory for the inputs"}]
    records = []
    for name, (fn, leaves) in implementations(op, args, device).items():
        if impls and name not in impls:
            continue
        rec = {"op": op.name, "mode": mode, "shape": shape, "impl": name, "bytes": nbytes, "flops": nflops}
        step = _with_backward(fn, grads) if mode == "fwd+bwd" else fn
        try:
            if device.type == "cuda":
                q = time_gpu(step, leaves)
            elif name == "triton-interp":  # one call: it is seconds long and says nothing of a GPU
                q = time_cpu(step, leaves, min_reps=1, budget_s=0, warmup=False)
            else:
                q = time_cpu(step, leaves, budget_s=cpu_budget_s)
        except Exception as err:  # e.g. out of memory, or a baseline without this dtype / head dim
            rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            records.append(rec)
            continue
        p50_s = q[1] / 1e3
        gbps = nbytes / p50_s / 1e9
        tflops = nflops / p50_s / 1e12 if nflops else None
        rec.update({
            "p20_ms": q[0], "p50_ms": q[1], "p80_ms": q[2], "gbps": gbps, "tflops": tflops,
            "frac_bw": gbps / ceiling["ceiling_gbps"],
            "frac_flops": tflops / ceiling["ceiling_tflops"] if tflops is not None else None,
        })
        records.append(rec)
    del args, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


# --------------------------------------------------------------------------------------------
# Ceilings, environment, output
# --------------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Bandwidth: a device-to-device copy (1 GiB on CUDA, 64 MiB on CPU), read + write bytes.
    FLOP/s: a square matmul in `dtype` (8192 on CUDA, 1024 on CPU)."""
    cuda = device.type == "cuda"
    n_bytes, n = (2**30, 8192) if cuda else (2**26, 1024)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timer = time_gpu if cuda else time_cpu
    copy_ms = timer(lambda: dst.copy_(src), [])[1]
    mm_ms = timer(lambda: a @ b, [])[1]
    return {"ceiling_gbps": 2 * n_bytes / (copy_ms / 1e3) / 1e9, "ceiling_tflops": 2 * n**3 / (mm_ms / 1e3) / 1e12,
            "ceiling_copy": f"{n_bytes >> 20} MiB", "ceiling_matmul": f"{str(dtype)[6:]} {n}^3"}


def environment(device: torch.device) -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=root).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}{v}" for k, v in shape.items())


def print_table(records: list[dict], file=sys.stdout) -> None:
    head = (f"{'op':<32} {'mode':<7} {'shape':<28} {'impl':<13} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} "
            f"{'GB/s':>8} {'%bw':>5} {'TFLOP/s':>8} {'%mm':>5} {'vs eager':>8}")
    print(head, file=file)
    print("-" * len(head), file=file)
    eager = {}
    for r in records:
        key = (r["op"], r["mode"], shape_str(r["shape"]))
        if r["impl"] == "eager" and "p50_ms" in r:
            eager[key] = r["p50_ms"]
        lead = f"{r['op']:<32} {r['mode']:<7} {shape_str(r['shape']):<28} {r['impl']:<13}"
        if "error" in r:
            print(f"{lead} {r['error']}", file=file)
            continue
        tf = f"{r['tflops']:8.2f} {100 * r['frac_flops']:4.0f}%" if r["tflops"] is not None else f"{'-':>8} {'-':>5}"
        speed = f"{eager[key] / r['p50_ms']:7.2f}x" if key in eager else f"{'-':>8}"
        print(f"{lead} {r['p20_ms']:9.3f} {r['p50_ms']:9.3f} {r['p80_ms']:9.3f} {r['gbps']:8.1f} "
              f"{100 * r['frac_bw']:4.0f}% {tf} {speed}", file=file)


def append_jsonl(path: str, records: list[dict]) -> None:
    """Append one JSON line per record and push it to disk now: a step killed later keeps it."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), help="ops to run (default: all)")
    p.add_argument("--quick", action="store_true", help="one real shape per op (GPU); CPU mode is always small")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help="time only these implementations (eager, compiled, triton, triton-interp, sdpa-flash, "
                        "sdpa, flash-attn, xformers); default: every one that can run")
    p.add_argument("--jsonl", "--results", dest="jsonl", default="results/kernels.jsonl",
                   help="JSON lines file; each case's records are appended as soon as it finishes")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 on a CUDA machine would time the interpreter: unset it")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    scale = "cpu" if not cuda else ("quick" if args.quick else "full")
    if not cuda:
        print(CPU_NOTE, flush=True)
        # One thread: on a shared machine OpenMP barriers wait out whole scheduler slices
        # (~16 ms per small op at 2 threads), which would swamp every timing here.
        torch.set_num_threads(1)

    env = environment(device)
    ceiling = measure_ceilings(device, dtype)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {str(dtype)[6:]}; measured ceilings: "
          f"{ceiling['ceiling_gbps']:.0f} GB/s (copy {ceiling['ceiling_copy']}), "
          f"{ceiling['ceiling_tflops']:.2f} TFLOP/s (matmul {ceiling['ceiling_matmul']})", flush=True)

    extra = {"benchmark": "kernels", "dtype": str(dtype)[6:], "cpu_reduced": not cuda, **env, **ceiling}
    if not cuda:
        extra["note"] = CPU_NOTE
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    records = []
    for name in args.ops:
        op = OPS[name]
        for mode in op.modes:
            for shape in op.shapes(scale, mode):
                print(f"  {name} {mode} {shape_str(shape)} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                case = run_case(op, shape, mode, dtype, device, ceiling, impls=args.impls)
                case = [{**r, **extra, "case_s": round(time.perf_counter() - t0, 2)} for r in case]
                append_jsonl(args.jsonl, case)
                records += case
    print()
    if not cuda:
        print(CPU_NOTE)
    print_table(records)
    print(f"\n{len(records)} records appended to {args.jsonl}")
    return records


if __name__ == "__main__":
    main()
