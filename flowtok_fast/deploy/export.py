"""`flowtok-fast export`: a model -> a package directory of three AOTInductor programs
(text.pt2, flow.pt2, decode.pt2) + manifest.json + runner.txt, with static shapes.

The flow stage is one guided Euler step called N times by default (`--flow step`): on CPU the
unrolled N-step program (`--flow loop`) ran no faster (tiny, batch 2, 4 steps: 58-69 ms vs
65-68 ms per sample call, within noise) while its compile time and size grow with N (95 s vs
56 s at N = 4), and the step program is what the C++ runner drives the same way.

Atomic: everything is built in a hidden temporary directory beside --out and renamed into place
at the end; an interrupted export leaves no directory named --out (and no manifest.json, which is
written last and is what makes a directory a package).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flowtok_fast import onednn_linear
from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.deploy import manifest as mf
from flowtok_fast.deploy.dtype import CHOICES as DTYPE_CHOICES, dtype_name, resolve_dtype
from flowtok_fast.deploy.stages import DecodeStage, FlowLoop, FlowStep, TextStage, lowp_weights
from flowtok_fast.errors import UserError
from flowtok_fast.validate import BATCH, CFG, COUNT, STEPS, check_new_output_dir

FLOW_MODES = ("step", "loop")
RUNNER_FILE = "runner.txt"


def stage_programs(pipe, batch: int, steps: int, cfg_scale: float, grid: str, dtype: torch.dtype, flow_mode: str):
    """{stage: (module, example inputs, input specs, output specs)} at the package's static shapes."""
    dev, kind, cfg = pipe.device, pipe.device.type, pipe.config
    lat = [batch, NUM_TOKENS, TOKEN_CHANNELS]
    feats = [batch, NUM_TOKENS, cfg.clip.width]
    res = cfg.tokenizer.resolution
    ids = torch.zeros(batch, NUM_TOKENS, dtype=torch.long, device=dev)
    noise = torch.zeros(lat, device=dev)
    flow_cls = FlowStep if flow_mode == "step" else FlowLoop
    # bf16: the weights go in as bf16 (what autocast feeds the matmuls), stored as such
    clip, generator, tokenizer = (lowp_weights(m, dtype) for m in (pipe.clip, pipe.generator, pipe.tokenizer))
    flow = flow_cls(generator, batch, steps, cfg_scale, grid, dtype, kind).to(dev)
    flow_in = (noise, torch.zeros(flow.rows, device=dev)) if flow_mode == "step" else (noise,)
    flow_specs = {"x": lat, "t": [flow.rows]} if flow_mode == "step" else {"x0": lat}
    return flow, {
        "text": (TextStage(clip, generator.context_encoder, dtype, kind), (ids, noise),
                 {"ids": lat[:2] + ["int64"], "noise": lat}, {"feats": feats, "z_text": lat}),
        "flow": (flow, flow_in, flow_specs, {"x": lat}),
        "decode": (DecodeStage(tokenizer, dtype, kind), (noise, torch.zeros(feats, device=dev)),
                   {"latents": lat, "feats": feats}, {"images": [batch, 3, res, res]}),
    }


def export_program(module, example: tuple):
    """torch.export of one stage; fp32 linears on a CPU traced as oneDNN's, not MKL's
    (onednn_linear.py: B's fp32 flow step in a package 2.01x)."""
    with torch.no_grad(), onednn_linear.linears(for_export=True):
        return torch.export.export(module.eval(), example, strict=False)


def compile_stage(module, example: tuple, path: Path, inductor_configs: dict | None = None) -> None:
    program = export_program(module, example)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=inductor_configs)


def export_package(pipe, out: str | Path, batch: int, steps: int = 20, cfg_scale: float = 2.0, grid: str = "reference",
                   dtype: torch.dtype = torch.float32, flow_mode: str = "step", force: bool = False,
                   progress: bool = True, inductor_configs: dict | None = None) -> Path:
    """Export `pipe` (a FlowTokPipeline; its reference ops are traced, Inductor fuses them itself)."""
    from flowtok_fast import ops
    from flowtok_fast.flow import GRIDS

    out = Path(out)
    if flow_mode not in FLOW_MODES:
        raise UserError(f"--flow: expected one of {FLOW_MODES}, got {flow_mode!r}")
    if grid not in GRIDS:
        raise UserError(f"--grid: expected one of {GRIDS}, got {grid!r}")
    if batch < 1 or steps < 1:
        raise UserError(f"--batch and --steps must be >= 1, got {batch} and {steps}")
    check_new_output_dir(out, force)
    for module in (pipe.generator, pipe.tokenizer):
        ops.use(module, "reference")
    flow, programs = stage_programs(pipe, batch, steps, cfg_scale, grid, dtype, flow_mode)
    weights = mf.weights_hash(pipe.clip, pipe.generator, pipe.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        files = {}
        bar = tqdm(programs.items(), desc="export", unit="stage", disable=not progress)
        for stage, (module, example, _, _) in bar:
            bar.set_postfix_str(f"{stage}: torch.export + AOTInductor compile")
            t0 = time.perf_counter()
            compile_stage(module, example, tmp / f"{stage}.pt2", inductor_configs)
            path = tmp / f"{stage}.pt2"
            files[stage] = {"name": path.name, "bytes": path.stat().st_size, "sha256": mf.file_sha256(path),
                            "compile_s": round(time.perf_counter() - t0, 1)}
        manifest = {
            "format": mf.FORMAT, "batch": batch, "steps": steps, "cfg_scale": float(cfg_scale), "grid": grid,
            "sampler": "euler", "flow_mode": flow_mode, "dtype": dtype_name(dtype), "device": str(pipe.device),
            "torch": torch.__version__, "flowtok_fast": mf.package_version(),
            "model": {"name": pipe.config.name, "config": mf.config_dict(pipe.config),
                      "weights_sha256": weights},
            "flow_times": [float(t) for t in flow.times], "flow_rows": flow.rows,
            "inputs": {s: p[2] for s, p in programs.items()}, "outputs": {s: p[3] for s, p in programs.items()},
            "files": files,
        }
        if pipe.device.type == "cpu":  # what a CPU needs to run it (refused at load without)
            manifest["cpu"] = mf.cpu_build_entry()
        write_runner_facts(tmp, manifest, pipe.config)
        mf.write(tmp, manifest)  # last: the directory is a package from here on
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_runner_facts(directory: Path, manifest: dict, config) -> None:
    """The facts the C++ runner needs, as `key value...` lines (no JSON parser in the runner)."""
    lines = [f"format {mf.FORMAT}", f"batch {manifest['batch']}", f"steps {manifest['steps']}",
             f"flow_mode {manifest['flow_mode']}", f"flow_rows {manifest['flow_rows']}",
             f"resolution {config.tokenizer.resolution}", f"device {manifest['device']}",
             "flow_times " + " ".join(repr(t) for t in manifest["flow_times"])]
    (directory / RUNNER_FILE).write_text("\n".join(lines) + "\n")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # --force: checked empty-or-allowed up front
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from flowtok_fast.cli_errors import OneLineParser

    p = OneLineParser(prog="flowtok-fast export", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model-dir", help="a flowtok-fast directory (config.json + model.safetensors)")
    src.add_argument("--checkpoint", help="official generator file, e.g. FlowTok-XL.pth (with --tokenizer and --clip)")
    src.add_argument("--tokenizer", help="official image tokenizer file, e.g. FlowTiTok_512.bin")
    src.add_argument("--clip", help="CLIP ViT-L/14-336 weights")
    src.add_argument("--random-weights", action="store_true", help="untrained weights (tests, benchmarks)")
    src.add_argument("--config", default="tiny", help="model size for --random-weights")
    src.add_argument("--resolution", type=int, default=256, help="tokenizer resolution for --random-weights (S..H)")
    p.add_argument("--batch", **BATCH, required=True, help="images per call (static; smaller requests are padded)")
    p.add_argument("--steps", **STEPS, default=None, help="(default: the model's recommendation)")
    p.add_argument("--cfg", **CFG, default=None, help="guidance scale, 1 = off (default: the model's recommendation)")
    p.add_argument("--sampler", choices=("euler",), default="euler", help="only Euler is exported")
    p.add_argument("--grid", choices=("reference", "consistent"), default=None, help="(default: the model's recommendation)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: bf16 on CUDA, fp32 on every CPU (bf16 there is opt-in)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the package runs only there")
    p.add_argument("--flow", choices=FLOW_MODES, default="step", help="flow stage: one step called N times, or the unrolled loop")
    p.add_argument("--out", required=True, help="the package directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--threads", **COUNT, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from flowtok_fast.loading import load_text_to_image
    from flowtok_fast.validate import resolve_device

    if args.batch < 1 or (args.steps is not None and args.steps < 1):
        raise UserError(f"--batch and --steps must be >= 1, got {args.batch} and {args.steps}")
    check_new_output_dir(Path(args.out), args.force)  # before any model is loaded
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, why = resolve_dtype(args.dtype, device)
    print(why)
    pipe = load_text_to_image(args.model_dir, args.checkpoint, args.tokenizer, args.clip,
                              args.config if args.random_weights else None, args.resolution,
                              device=args.device, fused_kernels=False, sampler_mode="eager")
    # not given: the model's recommendation (the sampler is always Euler here)
    opts = pipe.sampling_options(steps=args.steps, cfg_scale=args.cfg, grid=args.grid, method="euler")
    args.steps, args.cfg, args.grid = opts.steps, opts.cfg_scale, opts.grid
    print(pipe.sampling.describe(opts))
    t0 = time.perf_counter()
    export_package(pipe, args.out, args.batch, args.steps, args.cfg, args.grid, dtype, args.flow, args.force)
    print(f"wrote package {args.out} (batch {args.batch}, {args.steps} steps, cfg {args.cfg}, {dtype_name(dtype)}, "
          f"{device}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
