"""Measure how the shipped shapes models are best sampled, and record it in their directories.

    python -m examples.shapes.recommend [--write]

Every setting (Euler steps 1, 2, 4, 8, 25; the reference and the consistent grid; CFG 1.0, 1.5
and 2.0) is scored with the card's evaluator. The recommendation is chosen on TRAINING prompts
(t2i: 100 train-split prompts) and training-split scenes (i2t: 100), never on the evaluation
splits: the mean of colour and shape accuracy, the fewest steps among settings within 0.5 points
of the best, then the lower CFG. The evaluation splits (the card's `new` and `held_out`) are
reported for the chosen setting and for every other one. `--write` puts the choice into each
model directory's config.json 'sampling' section (with how it was chosen) and the table into
examples/shapes/models/recommend.json; quality.json's byte counts are updated to match.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from examples.shapes import data as D
from examples.shapes import evaluate as E
from examples.shapes import quality as Q
from examples.shapes.run import to_tensor, to_uint8

MODELS = Path(__file__).resolve().parent / "models"
STEPS, GRIDS, CFGS = (1, 2, 4, 8, 25), ("reference", "consistent"), (1.0, 1.5, 2.0)
TOLERANCE = 0.5  # points: settings this close to the best count as equally good (fewer steps win)


def _mean(rates: dict) -> float:
    return 50 * (rates["colour_accuracy"] + rates["shape_accuracy"])


@torch.no_grad()
def t2i_rates(pipe, prompts: list[str], setting: dict) -> dict:
    images = []
    for i in range(0, len(prompts), Q.BATCH):
        images += to_uint8(pipe(prompts[i:i + Q.BATCH], seed=Q.SEED, output="tensor", **setting))
    return Q.summary(E.evaluate_images(images, prompts)[0])


@torch.no_grad()
def i2t_rates(captioner, scenes, setting: dict) -> dict:
    px = to_tensor([im for _, im in scenes])
    captions = [c for i in range(0, len(px), 100) for c in captioner(px[i:i + 100], **setting)]
    return Q.summary(E.evaluate_captions(captions, [s.caption for s, _ in scenes])[0])


def choose(rows: list[dict]) -> dict:
    best = max(_mean(r["select"]) for r in rows)
    close = [r for r in rows if _mean(r["select"]) >= best - TOLERANCE]
    return min(close, key=lambda r: (r["setting"]["steps"], r["setting"]["cfg_scale"], r["setting"]["grid"] != "reference"))


def sweep(direction: str) -> dict:
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.pipeline import FlowTokPipeline

    rows = []
    if direction == "t2i":
        model = FlowTokPipeline.from_pretrained(str(MODELS / "t2i"), device="cpu")
        select = Q.prompts_for("train", 100)
        evals = {split: Q.prompts_for(split, count) for split, count in Q.PROTOCOLS["card"].t2i_prompts.items()}
        score = t2i_rates
    else:
        model = FlowTokCaptioner.from_pretrained(str(MODELS / "i2t"), device="cpu")
        captions = D.make_splits(seed=0).train
        select = D.generate(D.DatasetSpec("train", captions, 100, 4242, Q.RESOLUTION, Q.BACKGROUNDS, Q.JITTER))
        evals = {split: Q.scenes_for(split, count) for split, count in Q.PROTOCOLS["card"].i2t_images.items()}
        score = i2t_rates
    for steps, grid, cfg in itertools.product(STEPS, GRIDS, CFGS):
        setting = {"steps": steps, "grid": grid, "cfg_scale": cfg}
        row = {"setting": setting, "select": score(model, select, setting),
               **{split: score(model, items, setting) for split, items in evals.items()}}
        print(direction, setting, {k: f"{_mean(v):.1f}" for k, v in row.items() if k != "setting"}, flush=True)
        rows.append(row)
    return {"rows": rows, "chosen": choose(rows)}


def write(results: dict) -> None:
    from flowtok_fast import checkpoint as ckpt
    from flowtok_fast.sampling import Recipe

    for direction, res in results.items():
        s = res["chosen"]["setting"]
        how = (f"measured by examples/shapes/recommend.py: Euler {STEPS} steps x {GRIDS} grids x CFG {CFGS}, chosen on "
               f"training {'prompts' if direction == 't2i' else 'scenes'} (mean of colour and shape accuracy; fewest steps "
               f"within {TOLERANCE} points of the best); the evaluation splits are in recommend.json and MODEL_CARD.md")
        recipe = Recipe(steps=s["steps"], cfg_scale=s["cfg_scale"], method="euler", grid=s["grid"], how_chosen=how)
        path = MODELS / direction / ckpt.CONFIG_FILE
        payload = json.loads(path.read_text())
        payload["sampling"] = recipe.to_dict()
        path.write_text(json.dumps(payload, indent=2))
    (MODELS / "recommend.json").write_text(json.dumps(results, indent=1))
    quality_path = MODELS / "quality.json"
    quality = json.loads(quality_path.read_text())
    quality["bytes"] = {name: sum(f.stat().st_size for f in (MODELS / name).iterdir()) for name in ("t2i", "i2t")}
    quality_path.write_text(json.dumps(quality, indent=2) + "\n")


def table(results: dict) -> str:
    lines = []
    for direction, res in results.items():
        splits = [k for k in res["rows"][0] if k not in ("setting", "select")]
        lines += [f"\n{direction} (mean of colour and shape accuracy, %; chosen: {res['chosen']['setting']})\n",
                  "| steps | grid | cfg | train (selects) | " + " | ".join(splits) + " |",
                  "|---|---|---|---|" + "---|" * len(splits)]
        for r in res["rows"]:
            s = r["setting"]
            lines.append(f"| {s['steps']} | {s['grid']} | {s['cfg_scale']:g} | {_mean(r['select']):.1f} | "
                         + " | ".join(f"{_mean(r[k]):.1f}" for k in splits) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="record the choice in the model directories")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.seterr(all="ignore")
    results = {direction: sweep(direction) for direction in ("t2i", "i2t")}
    print(table(results))
    if args.write:
        write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
