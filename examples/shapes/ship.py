"""Ship a trained shapes run as the models in the box: `examples/shapes/models/{t2i,i2t}`.

    python -m examples.shapes.ship RUN_DIR                 # RUN_DIR: `python -m examples.shapes.run --out RUN_DIR`
    python -m examples.shapes.ship RUN_DIR --out DIR --threads 2

Loads the run's fp32 model directories (RUN_DIR/t2i/model, RUN_DIR/i2t/model), stores them
small (flowtok_fast/compact_storage.py: the grammar's vocabulary rows only, parameters in bf16 or
fp16), measures each candidate with quality.py's `card` protocol against the fp32 models, keeps
the half-precision form whose accuracies stay within 1 point (the closer of the two; bf16 on a
tie), and writes: the two model directories, `quality.json` (every number measured, the `ci`
protocol's numbers that tests/test_shipped_models.py checks, sizes, where it came from),
`samples.png` (the shipped t2i model on 16 new prompts) and `MODEL_CARD.md`.
Every file lands atomically; the model directories are replaced only once all is measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from examples.shapes import data as D
from examples.shapes import quality as Q
from examples.shapes import record as R
from examples.shapes.model_card import write_card
from examples.shapes.text_autoencoder import grammar_vocab
from flowtok_fast.captioning import FlowTokCaptioner
from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.errors import UserError
from flowtok_fast.pipeline import FlowTokPipeline

log = logging.getLogger("shapes")
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "models"
HALF = ("bfloat16", "float16")
TOLERANCE_POINTS = 1.0


def load_run(run: Path):
    dirs = {"t2i": run / "t2i" / "model", "i2t": run / "i2t" / "model"}
    for name, d in dirs.items():
        if not (d / "config.json").is_file():
            raise UserError(f"{run}: no {name} model at {d} (expected a finished `python -m examples.shapes.run "
                            f"--out {run}` with both directions)")
    results = run / "results.json"
    return (FlowTokPipeline.from_pretrained(str(dirs["t2i"]), device="cpu"),
            FlowTokCaptioner.from_pretrained(str(dirs["i2t"]), device="cpu"),
            json.loads(results.read_text()) if results.is_file() else {})


def save_compact(pipe, captioner, out: Path, dtype: str, vocab) -> dict[str, Path]:
    pipe.save_pretrained(str(out / "t2i"), dtype, vocab)
    captioner.save_pretrained(str(out / "i2t"), dtype, vocab)
    return {"t2i": out / "t2i", "i2t": out / "i2t"}


def load_shipped(dirs: dict[str, Path]):
    return (FlowTokPipeline.from_pretrained(str(dirs["t2i"]), device="cpu"),
            FlowTokCaptioner.from_pretrained(str(dirs["i2t"]), device="cpu"))


def points_apart(a: dict, b: dict) -> float:
    """Largest difference, in points, over every direction, split and metric of two `measure` results."""
    return max(abs(a[d][s][m] - b[d][s][m]) * 100 for d in a for s in a[d] for m in ("colour_accuracy", "shape_accuracy"))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m examples.shapes.ship", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished shapes run (both directions)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the models go (default: examples/shapes/models)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run, out = Path(args.run), Path(args.out)
    pipe, captioner, run_results = load_run(run)
    vocab = grammar_vocab(list(D.all_captions()))  # every word any split uses
    log.info(f"fp32 models of {run}; vocabulary {len(vocab)} token ids")
    card = {"float32": Q.measure(Q.PROTOCOLS["card"], pipe, captioner)}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".ship.") as tmp:
        candidates = {}
        for dtype in HALF:
            dirs = save_compact(pipe, captioner, Path(tmp) / dtype, dtype, vocab)
            card[dtype] = Q.measure(Q.PROTOCOLS["card"], *load_shipped(dirs))
            candidates[dtype] = (points_apart(card[dtype], card["float32"]), dirs)
            log.info(f"{dtype}: {candidates[dtype][0]:.2f} points from fp32 at most")
        dtype = min(HALF, key=lambda d: candidates[d][0])
        if candidates[dtype][0] > TOLERANCE_POINTS:
            raise UserError(f"neither bf16 nor fp16 storage keeps the accuracies within {TOLERANCE_POINTS} point of fp32 "
                            f"({', '.join(f'{d}: {candidates[d][0]:.2f}' for d in HALF)}): nothing shipped")
        shipped_pipe, shipped_captioner = load_shipped(candidates[dtype][1])
        ci = Q.measure(Q.PROTOCOLS["ci"], shipped_pipe, shipped_captioner)
        for name, src in candidates[dtype][1].items():  # swap in each directory whole
            dest = out / name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(src, dest)
    samples_prompts = Q.prompts_for("new", 16)
    from examples.shapes.run import captioned_grid

    captioned_grid(Q.t2i_images(shipped_pipe, samples_prompts), samples_prompts, cols=8, path=out / "samples.png")
    quality = {
        "storage_dtype": dtype, "tolerance_points": TOLERANCE_POINTS,
        "points_from_fp32": {d: round(candidates[d][0], 3) for d in HALF},
        "vocabulary_token_ids": len(vocab), "model_config": shipped_pipe.config.to_dict(),
        "sampling": {"method": "euler", "grid": "reference", "steps": Q.STEPS, "cfg_scale": Q.CFG_SCALE, "seed": Q.SEED},
        "card": card, "ci": ci,
        "bytes": {name: dir_bytes(out / name) for name in ("t2i", "i2t")},
        "fp32_bytes": {name: dir_bytes(run / name / "model") for name in ("t2i", "i2t")},
        "source_run": {k: run_results.get(k) for k in ("provenance", "machine", "digests", "timings")},
        "shipped_by": {**R.commit(), "command": " ".join(["python -m examples.shapes.ship", *argv]),
                       "machine": R.machine(args.threads)},
    }
    R.atomic_json(out / "quality.json", R.rounded(quality))
    write_card(out / "MODEL_CARD.md", quality, run_results)
    log.info(f"shipped {dtype} models to {out}: {quality['bytes']} bytes; CI numbers {json.dumps(R.rounded(ci))}")
    return 0


if __name__ == "__main__":  # the package's error boundary: bad input is one line and exit code 2
    from flowtok_fast.cli_errors import run

    sys.exit(run("example shapes ship", main, debug=bool(os.environ.get("FLOWTOK_DEBUG"))))
