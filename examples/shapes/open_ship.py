"""Ship the open-caption task's t2i teacher (open_train.py's run) as `examples/shapes/models/open_t2i`.

    python -m examples.shapes.open_ship RUN_DIR            # RUN_DIR: `python -m examples.shapes.open_train --out RUN_DIR`

Measures the run's fp32 model with open_quality's protocol at 1, 2, 4, 8 and 25 Euler steps on both
grids (CFG 1.0), stores it small (fp16 parameters + the grammar's vocabulary rows, as ship.py does;
refused if its 25-step scores move more than 1 point from fp32), records the best-scoring setting as
the model's recommended sampling (config.json `sampling`, with how it was chosen), re-measures the
stored model, and writes beside the models: `open_quality.json` (every number, the run's training
time and commit) and `open_samples.png` (one row per setting).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from examples.shapes import data as D
from examples.shapes import open_quality as Q
from examples.shapes import record as R
from examples.shapes.text_autoencoder import grammar_vocab
from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.errors import UserError

HERE = Path(__file__).resolve().parent
STEPS, GRIDS, CFG, DTYPE, TOLERANCE_POINTS = (1, 2, 4, 8, 25), ("reference", "consistent"), 1.0, "float16", 1.0


def sweep(pipe, prompts, keep=None) -> list[dict]:
    return [Q.measure(pipe, prompts, s, g, CFG, Q.SEEDS, keep) for g in GRIDS for s in STEPS]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m examples.shapes.open_ship", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an open_train run directory (RUN_DIR/model, RUN_DIR/train.json)")
    parser.add_argument("--out", default=str(HERE / "models"), help="where open_t2i/ and the files go")
    parser.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowtok_fast.pipeline import FlowTokPipeline
    from flowtok_fast.sampling import Recipe

    run, out = Path(args.run), Path(args.out)
    if not (run / "model" / "config.json").is_file():
        raise UserError(f"{run}: no model/ (expected a finished `python -m examples.shapes.open_train --out {run}`)")
    train = json.loads((run / "train.json").read_text()) if (run / "train.json").is_file() else {}
    prompts = Q.prompts_of("eval")
    fp32 = FlowTokPipeline.from_pretrained(str(run / "model"), device="cpu")
    full = sweep(fp32, prompts)
    best = max(full, key=lambda r: (r["steps"] == 25, sum(r[k] for k in Q.SCORES)))  # the teacher runs at 25 steps
    fp32.sampling = Recipe(steps=25, cfg_scale=CFG, method="euler", grid=best["grid"],
                           how_chosen=f"open_quality on the open task's evaluation prompts at 25 Euler steps, CFG 1.0: "
                                      f"the {best['grid']} grid scored highest (fixed + clean + coverage), see open_quality.json")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".open_ship.") as tmp_root:
        tmp = Path(tmp_root) / "open_t2i"
        fp32.save_pretrained(str(tmp), DTYPE, grammar_vocab(list(D.all_captions())))
        stored = FlowTokPipeline.from_pretrained(str(tmp), device="cpu")
        kept: list = []
        shipped = sweep(stored, prompts, kept)
        apart = max(abs(a[k] - b[k]) * 100 for a, b in zip(full, shipped) if a["steps"] == 25 for k in Q.SCORES)
        if apart > TOLERANCE_POINTS:
            raise UserError(f"{DTYPE} storage moves a 25-step score by {apart:.2f} points (> {TOLERANCE_POINTS}): nothing shipped")
        dest = out / "open_t2i"
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)  # the whole directory at once, once measured
    Q.sample_sheet(out / "open_samples.png", [f"{r['steps']}, {r['grid']}" for r in shipped], kept, prompts)
    data = Q.evaluate_open(*Q.data_images(prompts))
    R.atomic_json(out / "open_quality.json", R.rounded({
        "model": "examples/shapes/models/open_t2i", "storage_dtype": DTYPE, "points_from_fp32_at_25_steps": apart,
        "protocol": {"prompts": len(prompts), "split": "eval", "seeds": Q.SEEDS, "cfg_scale": CFG, "method": "euler"},
        "recommended": fp32.sampling.to_dict(), "data": data, "shipped": shipped, "fp32": full,
        "bytes": sum(f.stat().st_size for f in (out / "open_t2i").iterdir()),
        "training": {k: train.get(k) for k in ("provenance", "machine", "timings", "throughput", "splits", "latents", "digest")},
        "training_config": train.get("config"),
        "shipped_by": {**R.commit(), "command": " ".join(["python -m examples.shapes.open_ship", *argv]),
                       "machine": R.machine(args.threads)}}))
    print("| steps, grid | fixed attributes | clean objects | coverage |\n|---|---|---|---|")
    print(Q.row("data images", data))
    for r in shipped:
        print(Q.row(f"{r['steps']}, {r['grid']}", r))
    return 0


if __name__ == "__main__":  # the package's error boundary: bad input is one line and exit code 2
    from flowtok_fast.cli_errors import run

    sys.exit(run("example shapes open_ship", main, debug=bool(os.environ.get("FLOWTOK_DEBUG"))))
