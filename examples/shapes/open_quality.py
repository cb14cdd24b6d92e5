"""Score a text-to-image model directory on the open-caption task (open_data.py, open_evaluate.py).

    python -m examples.shapes.open_quality MODEL_DIR --steps 1 --grid consistent --cfg 1.0 --out scores.json
    python -m examples.shapes.open_quality examples/shapes/models/open_t2i --steps 1 2 4 8 25 --grid reference consistent

Protocol: the evaluation split's prompts (32 captions no training image has; `--split train` for the
training prompts), each drawn with seeds 0..7 (one batch of every prompt per seed; row k of a batch
is the seed's k-th draw, as the pipeline does), Euler, the given steps, grid and CFG scale. Prints
one row per (steps, grid): fixed attributes, clean objects, coverage (%), and the same scores of
8 data images per prompt (the reference: ~100% each). --out: every number, per caption form too,
with the commit and the command.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from examples.shapes import open_data as O
from examples.shapes import record as R
from examples.shapes.open_evaluate import evaluate_open
from flowtok_fast.cli_errors import OneLineParser

SEEDS = 8
SCORES = ("fixed_attributes", "clean_objects", "coverage")


def prompts_of(split: str, seed: int = 0) -> list[str]:
    return list(getattr(O.make_open_splits(seed), split))


@torch.no_grad()
def model_images(pipe, prompts: list[str], steps: int, grid: str, cfg_scale: float, seeds: int = SEEDS):
    """(images, captions): every prompt once per seed."""
    from examples.shapes.run import to_uint8

    images, captions = [], []
    for seed in range(seeds):
        images += to_uint8(pipe(prompts, steps=steps, cfg_scale=cfg_scale, seed=seed, grid=grid, output="tensor"))
        captions += prompts
    return images, captions


def data_images(prompts: list[str], seeds: int = SEEDS):
    images, captions = [], []
    for p in prompts:
        images += [im for _, im in O.samples_of(p, seeds, 0)]
        captions += [p] * seeds
    return images, captions


def measure(pipe, prompts: list[str], steps: int, grid: str, cfg_scale: float, seeds: int = SEEDS, keep: list | None = None) -> dict:
    """The scores of one setting; keep: a list the images and captions are appended to."""
    t0 = time.perf_counter()
    images, captions = model_images(pipe, prompts, steps, grid, cfg_scale, seeds)
    if keep is not None:
        keep.append((images, captions))
    return {"steps": steps, "grid": grid, "cfg_scale": cfg_scale, "seeds": seeds, **evaluate_open(images, captions),
            "seconds": round(time.perf_counter() - t0, 1)}


def sample_sheet(path: Path, labels: list[str], kept: list, prompts: list[str], per_prompt: int = 4) -> None:
    """One row per setting: the first prompt of each caption form, `per_prompt` seeds each."""
    from examples.shapes.run import captioned_grid

    shown = [next(p for p in prompts if O.parse_open(p).form == f) for f in O.FORMS if any(O.parse_open(p).form == f for p in prompts)]
    images, caps = [], []
    for label, (ims, cs) in zip(labels, kept):
        for p in shown:
            idx = [i for i, c in enumerate(cs) if c == p][:per_prompt]
            images += [ims[i] for i in idx]
            caps += [f"{label}: {p}"] + [""] * (len(idx) - 1)
    captioned_grid(images, caps, cols=len(shown) * per_prompt, path=path)


def row(label: str, r: dict) -> str:
    return f"| {label} | " + " | ".join(f"{100 * r[k]:.1f}%" for k in SCORES) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m examples.shapes.open_quality", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a text-to-image model directory (config.json + model.safetensors)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--grid", nargs="+", default=["reference"], help="reference and/or consistent")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale (default 1.0, the teacher's)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--split", default="eval", choices=("eval", "train"))
    parser.add_argument("--out", default=None, help="JSON file for every number")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", default=None, metavar="PNG", help="a sheet of samples: one row per setting")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline.from_pretrained(args.model, device="cpu")
    prompts = prompts_of(args.split)
    data = evaluate_open(*data_images(prompts, args.seeds))
    print(f"{args.model}: {len(prompts)} {args.split} prompts x {args.seeds} seeds, CFG {args.cfg}, Euler")
    print("| steps, grid | fixed attributes | clean objects | coverage |\n|---|---|---|---|")
    print(row("data images", data), flush=True)
    results, kept, labels = [], [] if args.samples else None, []
    for grid in args.grid:
        for steps in args.steps:
            results.append(measure(pipe, prompts, steps, grid, args.cfg, args.seeds, kept))
            labels.append(f"{steps}, {grid}")
            print(row(labels[-1], results[-1]), flush=True)
    if args.samples:
        sample_sheet(Path(args.samples), labels, kept, prompts)
    if args.out:
        R.atomic_json(Path(args.out), R.rounded({
            "model": args.model, "split": args.split, "prompts": len(prompts), "data": data, "results": results,
            "measured_by": {**R.commit(), "command": " ".join(["python -m examples.shapes.open_quality", *argv]),
                            "machine": R.machine(args.threads)}}))
    return 0


if __name__ == "__main__":  # the package's error boundary: bad input is one line and exit code 2
    from flowtok_fast.cli_errors import run

    sys.exit(run("example shapes open_quality", main, debug=bool(os.environ.get("FLOWTOK_DEBUG"))))
