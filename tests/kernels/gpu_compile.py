"""Compile the kernel variants that really launch, for sm_80 (A100) and sm_90 (H100/H200), without
a GPU, and read each one's resource usage and 16-byte vector memory operations.

Which variants: the real launchers (the custom ops' Python code, forward and backward) run at
the real model shapes on CPU tensors with every Triton launch recorded instead of executed
(nothing is computed). Each recorded launch is then specialised by Triton's own launcher code
(its argument binder: pointers and integers divisible by 16, integer 1, constexprs, num_warps,
num_stages) and compiled for each target: the compiled code is the code a real launch at those
shapes gets, 16-byte vector loads where the launch values allow them, scalar loads where not.

@triton.jit picks interpreter or compiler at import, and the tests import the kernels under
TRITON_INTERPRET=1, so this runs in a child process with TRITON_INTERPRET=0:

    python -m tests.kernels.gpu_compile            # one JSON line per (variant, arch)
    python -m tests.kernels.gpu_compile --report   # also writes docs/KERNEL_RESOURCES.md
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
REPORT = ROOT / "docs" / "KERNEL_RESOURCES.md"

# A 16-byte global memory access in PTX: a 4 x 32-bit vector load (8 bf16 or 4 fp32), or the
# 16-byte asynchronous copy the software pipeline (num_stages > 1) uses on sm_80+.
_VEC16 = re.compile(r"ld\.global(?:\.[\w:]+)*\.v4\.[bfsu]32|ld\.global(?:\.[\w:]+)*\.v8\.[bf]16|"
                    r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)* \[[^\]]*\], \[[^\]]*\], 16")


@dataclass
class Variant:
    """One compiled specialisation of a kernel, as a real launch at `scenario` gets it."""
    kernel: str
    scenario: str  # the first real launch that uses it
    tag: str  # what tells it from the kernel's other variants: flags set, pointer dtypes in order
    constexprs: dict
    divisible_by_16: list  # argument names Triton specialised as multiples of 16
    num_warps: int
    num_stages: int
    rows_aligned: bool  # 16-byte vector loads expected (else `why_scalar` says why not)
    why_scalar: str = ""


@dataclass
class Resources:
    kernel: str
    scenario: str
    tag: str
    arch: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int
    vec16_ops: int  # 16-byte global loads / async copies in the PTX
    rows_aligned: bool
    why_scalar: str = ""
    constexprs: dict = field(default_factory=dict)
    divisible_by_16: list = field(default_factory=list)
    num_warps: int = 0
    num_stages: int = 0

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.scenario}; {self.tag}]"

    def __str__(self) -> str:
        return (f"sm_{self.arch} {self.name}: REG {self.registers}, SHARED {self.shared_bytes} B, "
                f"STACK {self.stack_bytes}, LOCAL {self.local_bytes}, 16-byte memory ops {self.vec16_ops}")


# --------------------------------------------------------------------------------------------
# The real launches
# --------------------------------------------------------------------------------------------
# Variants that cannot use 16-byte accesses although their rows are aligned: kernel -> why.
_BF16_ADALN_BWD = {"_adaln_bwd_kernel": "16 warps over a 2048-wide row tile: 4 bf16 (8 bytes) per thread"}


def _scenarios():
    """(label, rows aligned, {kernel: why no 16-byte loads}, fn): fn calls the public ops
    forward and backward at one real shape.
    B = 16 samples: the real batches (64, 128, CFG-doubled) are multiples of 16 too, so every
    B * N that reaches a kernel is divisible by 16 exactly as at the real batch."""
    import torch

    from flowtok_fast.kernels import adaln, attention, flow_step, swiglu

    bf16, f32 = torch.bfloat16, torch.float32
    B = 16

    def t(*shape, dtype=bf16):
        return torch.empty(*shape, dtype=dtype).requires_grad_()

    def backward(*outs):
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [torch.ones_like(o) for o in outs if o.requires_grad])

    def adaln_chain(D, resid):
        def run():
            x, y, ada = t(B, 77, D, dtype=resid), t(B, 77, D), t(B, 6 * D)  # a [B, 6D] adaLN output
            shift, scale, gate = ada.chunk(6, dim=1)[:3]  # strided views, as in the model
            backward(adaln.ln_modulate(x, shift, scale, out_dtype=bf16))
            backward(adaln.gated_residual(x, y, gate))
            backward(*adaln.gated_residual_ln_modulate(x, y, gate, shift, scale, out_dtype=bf16))
        return run

    def gelu(F):
        def run():
            x = t(B, 77, F)
            backward(swiglu.gelu_tanh(x, t(F, dtype=f32), out_dtype=bf16))  # autocast: fp32 bias fused
            backward(swiglu.gelu_tanh(x, t(F)))
            backward(swiglu.gelu_tanh(x))
        return run

    def attn(N, H, hd, R):
        def run():
            qkv = t(B, N, 3, H, hd)
            tables = (torch.empty(R, hd), torch.empty(R, hd)) if R else (None, None)
            backward(attention.attention(qkv, *tables))
        return run

    def swiglu_at(N, h):
        return lambda: backward(swiglu.swiglu(t(B, N, 2 * h)))

    def flow_steps():
        x, v = torch.empty(B, 77, 16), torch.empty(2 * B, 77, 16, dtype=bf16)
        dt, scale = torch.empty(()), torch.empty(())
        flow_step.cfg_euler_step_(x, v, dt, scale)  # CUDA-graph sampler: device scalars
        flow_step.cfg_euler_step_(x, v, 0.05, 2.0)
        flow_step.euler_step_(x, v[:B], dt)
        flow_step.euler_step_(x, v[:B], 0.05)

    return [
        # Generator XL (D 1152, 16 heads of 72) and H (D 1280, 20 heads of 64), 77 tokens.
        ("XL D1152 autocast", True, {}, adaln_chain(1152, f32)),
        ("XL D1152 bf16", True, _BF16_ADALN_BWD, adaln_chain(1152, bf16)),
        ("H D1280 autocast", True, {}, adaln_chain(1280, f32)),
        ("H D1280 bf16", True, _BF16_ADALN_BWD, adaln_chain(1280, bf16)),
        ("XL fc1 F4608", True, {}, gelu(4 * 1152)),
        ("H fc1 F5120", True, {}, gelu(4 * 1280)),
        # N is a runtime argument that 77 and 410 both leave unspecialised: these variants are
        # also the plain attention at 410 tokens (the kernel benchmark's N = 410 cases).
        ("XL N77 H16 hd72", True, {}, attn(77, 16, 72, 0)),
        ("H N77 H20 hd64", True, {}, attn(77, 20, 64, 0)),
        # Tokenizer decoder at 256 px: 410 tokens, the first 256 rotated (hd 64: RoPE at hd 72
        # launches nowhere); SwiGLU h 2730 (decoder) / 2048.
        ("decoder N410 H16 hd64 R256", True, {}, attn(410, 16, 64, 256)),
        ("decoder N410 h2730", False, {}, swiglu_at(410, 2730)),
        ("N410 h2048", True, {}, swiglu_at(410, 2048)),
        ("sampler x[B,77,16] fp32, v bf16", True, {}, flow_steps),
    ]


@contextlib.contextmanager
def _recording():
    """Every JIT launch is recorded as (kernel, args, kwargs) instead of run; the launchers'
    device check (CUDA, or CPU under the interpreter) is lifted: nothing runs on these tensors."""
    from triton.runtime.jit import JITFunction

    from flowtok_fast.kernels import adaln, attention, flow_step, swiglu

    launches = []
    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    modules = (adaln, attention, flow_step, swiglu)
    checks = [m.check_device for m in modules]
    for m in modules:
        m.check_device = lambda *tensors, op: None
    try:
        yield launches
    finally:
        JITFunction.run = run
        for m, check in zip(modules, checks):
            m.check_device = check


def _specialise(fn, args, kwargs, arch: int):
    """What JITFunction.run does before compiling: Triton's binder and _pack_args."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {"debug": False, **kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return target, options, signature, constexprs, attrs, specialization


def real_variants():
    """[(Variant, fn, args, kwargs)]: the distinct specialisations the real launches compile."""
    out, seen = [], set()
    for label, aligned, scalar, run in _scenarios():
        with _recording() as launches:
            run()
        for fn, args, kwargs in launches:
            _, options, signature, constexprs, attrs, spec = _specialise(fn, args, kwargs, 90)
            key = f"{fn.__name__}|{spec}|{kwargs.get('num_warps')}|{kwargs.get('num_stages')}"
            if key in seen:
                continue
            seen.add(key)
            names = fn.arg_names
            const = {names[k[0]]: (v if isinstance(v, (bool, int, float)) else str(v)) for k, v in constexprs.items()
                     if names[k[0]] in kwargs}
            div16 = [names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v]
            why = scalar.get(fn.__name__, "" if aligned else "rows not 16-byte aligned")
            flags = [k for k, v in const.items() if v is True]
            # pointer dtypes in argument order, one letter each: f fp32, b bf16, h fp16
            ptrs = "".join({"*fp32": "f", "*bf16": "b", "*fp16": "h"}.get(v, "?")
                           for v in signature.values() if v.startswith("*"))
            tag = " ".join(flags + [f"ptrs {ptrs}"])
            out.append((Variant(fn.__name__, label, tag, const, div16, options.num_warps, options.num_stages,
                                aligned and not why, why), fn, args, kwargs))
    return out


def compile_variant(fn, args, kwargs, arch: int) -> tuple:
    """(cuobjdump's resource usage text, Triton's dynamic shared bytes, the PTX)."""
    import triton
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs, _ = _specialise(fn, args, kwargs, arch)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.remove(path)
    return usage, int(getattr(compiled.metadata, "shared", 0) or 0), compiled.asm["ptx"]


def _resources(variant: Variant, arch: int, usage: str, shared: int, ptx: str) -> Resources:
    def fld(key):
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    # Triton allocates shared memory dynamically: cuobjdump's SHARED is only the static part
    return Resources(variant.kernel, variant.scenario, variant.tag, arch, fld("REG"), max(fld("SHARED"), shared), fld("STACK"),
                     fld("LOCAL"), len(_VEC16.findall(ptx)), variant.rows_aligned, variant.why_scalar, variant.constexprs,
                     variant.divisible_by_16, variant.num_warps, variant.num_stages)


_WORK = None  # the child's variants, by index, for the worker processes (fork start method)


def _compile_job(job):
    index, arch = job
    variant, fn, args, kwargs = _WORK[index]
    try:
        return asdict(_resources(variant, arch, *compile_variant(fn, args, kwargs, arch)))
    except Exception as err:  # reported per variant by the test
        return {"kernel": variant.kernel, "scenario": variant.scenario, "tag": variant.tag, "arch": arch,
                "error": repr(err)[:2000]}


def compile_all(workers: int = 2) -> list:
    """Every real variant for every arch: a list of Resources dicts (or {"error": ...})."""
    global _WORK
    _WORK = real_variants()
    jobs = [(i, arch) for i in range(len(_WORK)) for arch in ARCHS]
    if workers <= 1:
        return [_compile_job(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, jobs))


def compile_all_in_child(timeout: int = 900) -> list:
    """[Resources or {"error"}], compiled by a non-interpreting child process."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compile child failed:\n{proc.stderr[-4000:]}")
    out = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        out.append(rec if "error" in rec else Resources(**rec))
    return out


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def report(records: list) -> str:
    import torch
    import triton

    by_variant = {}
    for r in records:
        by_variant.setdefault((r["kernel"], r["scenario"], r["tag"]), {})[r["arch"]] = r
    lines = [
        "# Kernel resources: the variants that really launch",
        "",
        "Generated by `python -m tests.kernels.gpu_compile --report` (no GPU needed) with "
        f"torch {torch.__version__}, triton {triton.__version__}; do not edit by hand.",
        "",
        "Each row is one compiled specialisation of a Triton kernel, found by running the real",
        "launchers at the real model shapes (generator XL D 1152 / H D 1280 at 77 tokens, hd 72 / 64;",
        "tokenizer decoder at 410 tokens with 256 rotated; SwiGLU h 2730 / 2048; the sampler step)",
        "and specialising each launch with Triton's own launcher code, so pointer and integer",
        "divisibility by 16 is what the launch values give. `REG` registers per thread, `STACK` /",
        "`LOCAL` bytes (non-zero = register spills), `SHARED` bytes (static + Triton's dynamic),",
        "`ptrs` the pointer arguments' dtypes in order (f fp32, b bf16, h fp16),",
        "`vec16` the 16-byte global loads / async copies in the PTX (expected wherever rows are",
        "16-byte aligned, unless the row tile gives a thread fewer than 16 bytes: the reason is",
        "given). SwiGLU at h 2730 has 5460-byte half-rows, so no vector loads there. Read with",
        "cuobjdump --dump-resource-usage, as `tests/kernels/test_gpu_compile.py` checks them.",
        "",
        "| kernel | first launched by | flags, pointer dtypes | warps / stages | divisible by 16 "
        "| sm_80 REG / STACK / LOCAL / SHARED | sm_90 REG / STACK / LOCAL / SHARED | vec16 (sm_90) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(r):
        if r is None or "error" in r:
            return "compile error"
        return f"{r['registers']} / {r['stack_bytes']} / {r['local_bytes']} / {r['shared_bytes']}"

    for (kernel, scenario, tag), archs in by_variant.items():
        any_r = next(r for r in archs.values())
        sm90 = archs.get(90)
        lines.append(
            f"| `{kernel}` | {scenario} | {tag} | {any_r.get('num_warps', '')} / {any_r.get('num_stages', '')} | "
            f"{', '.join(any_r.get('divisible_by_16', [])) or '-'} | {cell(archs.get(80))} | {cell(sm90)} | "
            f"{sm90['vec16_ops'] if sm90 and 'error' not in sm90 else '-'}"
            f"{' (' + any_r['why_scalar'] + ')' if any_r.get('why_scalar') else ''} |")
    return "\n".join(lines) + "\n"


def write_report(records: list, path: Path = REPORT) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(report(records))
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Compile the kernels' real launch variants for sm_80 / sm_90.")
    p.add_argument("--report", action="store_true", help=f"write {REPORT.relative_to(ROOT)}")
    p.add_argument("--workers", type=int, default=2, help="compile processes")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        sys.exit("run with TRITON_INTERPRET=0 (the kernels must be imported for compilation)")
    records = compile_all(args.workers)
    for rec in records:
        print(json.dumps(rec), flush=True)
    if args.report:
        write_report(records)
        print(f"wrote {REPORT}", file=sys.stderr)


if __name__ == "__main__":
    main()
