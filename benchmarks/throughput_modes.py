"""The sampler modes of benchmarks/throughput.py and how one batch is timed in each.

A mode takes a built FlowTokPipeline and returns the record of its steady state: the median batch
time over `repeats` (after a warm-up), per stage (CLIP, text VAE, flow loop, decoder), and the
set-up it paid first. `package` exports the pipeline into a temporary AOTInductor package
(flowtok_fast/deploy: timed on its own, `export_s`), loads it (`load_s`) and times the package's
three programs at the same batch, steps and guidance.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from flowtok_fast import fast_sampler
from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.errors import UserError
from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions

STAGES = ("clip", "text_vae", "flow", "decoder")
# mode -> (ops implementation, FastSampler mode or None for the pipeline's own sampler, compile)
MODES = {
    "eager": ("reference", None, False),
    "fused": ("triton", None, False),
    "compiled": ("reference", "compile", True),
    "graph": ("reference", "graph", True),
    "fused-graph": ("triton", "graph", False),
    "reduce-overhead": ("reference", "reduce-overhead", True),
    "package": ("reference", "package", True),  # AOTInductor: compiled once, ahead of time
}
# measured unless --modes names them: exporting costs minutes (one AOT compile per stage)
OPT_IN = ("package",)
DEFAULT_MODES = [m for m in MODES if m not in OPT_IN]


def skip_reason(mode: str, device: torch.device) -> str | None:
    impl, sampler, _ = MODES[mode]
    if device.type == "cuda":
        return None
    if impl == "triton":
        return "Triton kernels need CUDA (on CPU they run only in the interpreter, for tests)"
    if sampler in fast_sampler.CUDA_ONLY:
        return "CUDA graphs need CUDA"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimes(dict):
    """{stage: wall seconds}, and .cpu {stage: CPU seconds of this process} beside it (on a loaded
    machine with one thread, CPU time is the measure; wall time counts the other jobs too)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.cpu = {}


def _timer(device: torch.device, out: StageTimes):
    def timed(name, fn):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        _sync(device)
        out[name] = time.perf_counter() - t0
        out.cpu[name] = time.process_time() - c0
        return result
    return timed


def time_stages(pipe: FlowTokPipeline, prompts: torch.Tensor, opts: SamplingOptions, flow_fn, decode_fn) -> dict[str, float]:
    """Seconds per stage for one batch."""
    out = StageTimes()
    timed = _timer(pipe.device, out)
    feats = timed("clip", lambda: encode_ids(pipe, prompts))
    z = timed("text_vae", lambda: pipe.text_latents(feats, pipe.generator_rng(opts.seed)))
    x = timed("flow", lambda: flow_fn(z))
    timed("decoder", lambda: decode_fn(x, feats))
    return out


def time_package_stages(pkg, ids: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Seconds per stage for one batch of a PackagePipeline. CLIP and the text VAE are one program
    there: its time (with the seeded noise it is given, drawn as FlowTokPipeline draws it) is in
    `clip`, and `text_vae` is 0."""
    out = StageTimes({"text_vae": 0.0})
    out.cpu["text_vae"] = 0.0
    timed = _timer(pkg.device, out)

    def text():
        noise = torch.randn((ids.shape[0], NUM_TOKENS, TOKEN_CHANNELS), device=pkg.device,
                            generator=torch.Generator(pkg.device).manual_seed(seed))
        return pkg.text(ids, noise)

    feats, z = timed("clip", text)
    x = timed("flow", lambda: pkg.flow(z))
    timed("decoder", lambda: pkg.decode_program(x, feats))
    return out


def token_ids(batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, 77] CLIP token ids without the BPE tokenizer (open_clip need not be installed):
    start token, 20 random word ids, end token, zero padding, like a short prompt. The text
    tower's cost does not depend on which ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, NUM_TOKENS, dtype=torch.long)
    ids[:, 0], ids[:, 21] = 49406, 49407
    ids[:, 1:21] = torch.randint(256, 49406, (batch, 20), generator=g)
    return ids


@torch.no_grad()
def encode_ids(pipe: FlowTokPipeline, ids: torch.Tensor) -> torch.Tensor:
    """The pipeline's CLIP stage on token ids (what `pipe.encode_text` does after tokenizing)."""
    ids = ids.to(pipe.device, non_blocking=True)
    with pipe.autocast():
        return pipe.clip(ids)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _summary(mode: str, impl: str, batch: int, runs: list[dict], setup_s: float, device: torch.device) -> dict:
    totals = [sum(r.values()) for r in runs]
    med = statistics.median(totals)
    return {"mode": mode, "ops": impl, "images_per_s": batch / med, "seconds_median": med, "seconds_min": min(totals),
            "seconds_max": max(totals), "repeats": len(runs), "stages_s": {s: statistics.median(r[s] for r in runs)
                                                                          for s in STAGES},
            "setup_s": setup_s, "peak_mem_gib": _peak_gib(device),
            "cpu_seconds_median": statistics.median(sum(r.cpu.values()) for r in runs),
            "cpu_stages_s": {s: statistics.median(r.cpu[s] for r in runs) for s in STAGES}}


def run_mode(pipe: FlowTokPipeline, mode: str, batch: int, steps: int, cfg: float, repeats: int,
             package: str | None = None) -> dict:
    if mode == "package":
        return run_package(pipe, batch, steps, cfg, repeats, package)
    impl, sampler_mode, compile_ = MODES[mode]
    pipe.set_fused_kernels(impl == "triton")
    opts = SamplingOptions(steps=steps, cfg_scale=cfg)
    prompts = token_ids(batch)
    dev = pipe.device
    _peak_reset(dev)
    t0 = time.perf_counter()
    if sampler_mode is None:
        flow_fn, decode_fn = (lambda z: pipe.flow(z, opts)), pipe.decode
        # warm-up: every code path once (allocator, kernels); 2 steps are as good as 20
        time_stages(pipe, prompts, SamplingOptions(steps=min(2, steps), cfg_scale=cfg), flow_fn, decode_fn)
    else:
        flow_fn = fast_sampler.FastSampler(pipe.generator, batch, steps, cfg, mode=sampler_mode, dtype=pipe.dtype,
                                           compile=compile_)
        decode_fn = fast_sampler.decoder(pipe.tokenizer, pipe.dtype, compile=compile_)  # as FlowTokPipeline.decode
        for _ in range(2):  # warm-up: compilation (static shapes), then CUDA graph trees record on the 2nd call
            time_stages(pipe, prompts, opts, flow_fn, decode_fn)
    setup_s = time.perf_counter() - t0
    runs = [time_stages(pipe, prompts, opts, flow_fn, decode_fn) for _ in range(repeats)]
    return _summary(mode, impl, batch, runs, setup_s, dev)


def run_package(pipe: FlowTokPipeline, batch: int, steps: int, cfg: float, repeats: int,
                package: str | None = None) -> dict:
    """Export `pipe` (its dtype and device) into a temporary package, load it, time it; or time
    `package`, an existing one (built for this batch, steps, guidance, dtype and device: checked).
    export_s is the one-off AOT compile (None for a given package); setup_s = loading + the first
    (warm-up) batch, what a process started from the package pays before its steady state."""
    from flowtok_fast.deploy import export
    from flowtok_fast.deploy.dtype import dtype_name
    from flowtok_fast.deploy.package_pipeline import PackagePipeline

    pipe.set_fused_kernels(False)  # the package traces the reference ops; Inductor fuses them
    ids = token_ids(batch).to(pipe.device)
    with tempfile.TemporaryDirectory(prefix="throughput-package-") as tmp:
        export_s = None
        if package is None:
            t0 = time.perf_counter()
            package = export.export_package(pipe, Path(tmp) / "pkg", batch, steps, cfg, dtype=pipe.dtype)
            export_s = time.perf_counter() - t0
        _peak_reset(pipe.device)
        t0 = time.perf_counter()
        pkg = PackagePipeline.load(package, batch=batch, device=pipe.device, dtype=dtype_name(pipe.dtype))
        pkg.check_options(steps=steps, cfg_scale=cfg)
        built_for = pkg.manifest["model"]["name"]
        if built_for != pipe.config.name:
            raise UserError(f"--package {str(package)!r} was built for model {built_for}, the benchmark runs "
                            f"{pipe.config.name}: pass --model {built_for}")
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            time_package_stages(pkg, ids)  # warm-up: first calls of the loaded programs
            setup_s = time.perf_counter() - t0
            runs = [time_package_stages(pkg, ids) for _ in range(repeats)]
    return {**_summary("package", "reference", batch, runs, setup_s, pipe.device), "export_s": export_s,
            "load_s": load_s, "package": None if export_s is not None else str(package),
            "flow_mode": pkg.manifest["flow_mode"],
            "stages_note": "clip holds CLIP + text VAE (one program in the package); text_vae is 0"}
