"""How well a trained shapes model does, measured the same way by `ship.py` (the numbers of the
model card) and by CI (`tests/test_shipped_models.py`, which asserts they still hold).

Two protocols over the example's splits (default data settings: seed 0, jitter 0.25, black):
- `card`: t2i on every new-split prompt (86) and 100 held-out prompts, one image each; i2t on the
  run's 200 new-split and 200 held-out evaluation scenes;
- `ci`: 66 new-split prompts and the first 64 new-split scenes (small enough for CI).
Sampling: Euler, 25 steps, CFG 1.0, the reference time grid, as the example's own evaluation; t2i
prompts go in batches of 6, each drawn from seed 0 (row k of a batch: the seed's generator, as the
pipeline draws it). Six rows: the compiled-sampler test then reuses the Inductor cache of the
pipeline's own compile test (3 prompts with CFG: 6 rows), and 66 prompts are 11 full batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from examples.shapes import data as D
from examples.shapes import evaluate as E
from examples.shapes.draw import SPLIT_SEED
from examples.shapes.run import to_tensor, to_uint8

STEPS, CFG_SCALE, SEED, BATCH = 25, 1.0, 0, 6
JITTER, BACKGROUNDS, RESOLUTION = 0.25, ("black",), 32  # configs/default.yaml's data section


@dataclass(frozen=True)
class Protocol:
    name: str
    t2i_prompts: dict[str, int | None]  # split -> how many prompts (None: all of them)
    i2t_images: dict[str, int]  # split -> how many evaluation scenes


PROTOCOLS = {
    "card": Protocol("card", {"new": None, "held_out": 100}, {"new": 200, "held_out": 200}),
    "ci": Protocol("ci", {"new": 66}, {"new": 64}),
}


def prompts_for(split: str, count: int | None, seed: int = 0) -> list[str]:
    """`count` prompts of a split, without repeats, in a seeded order (all of them for None)."""
    pool = list(getattr(D.make_splits(seed=seed), split))
    if count is None or count >= len(pool):
        return pool
    return [pool[i] for i in np.random.default_rng(seed + 99).choice(len(pool), size=count, replace=False)]


def scenes_for(split: str, count: int, seed: int = 0) -> list[tuple[D.Scene, np.ndarray]]:
    """The run's evaluation scenes of a split (make_data's spec and seed): scene i is a function of (seed, i)."""
    captions = getattr(D.make_splits(seed=seed), split)
    return D.generate(D.DatasetSpec(split, captions, count, seed * 1000 + SPLIT_SEED[split], RESOLUTION, BACKGROUNDS, JITTER))


@torch.no_grad()
def t2i_images(pipe, prompts: list[str], batch: int = BATCH) -> list[np.ndarray]:
    """One image per prompt, batches of `batch` each seeded with SEED."""
    out = []
    for i in range(0, len(prompts), batch):
        images = pipe(prompts[i:i + batch], steps=STEPS, cfg_scale=CFG_SCALE, seed=SEED, output="tensor")
        out += to_uint8(images)
    return out


@torch.no_grad()
def captions_for(captioner, scenes, batch: int = 100) -> list[str]:
    px = to_tensor([im for _, im in scenes])
    return [c for i in range(0, len(px), batch) for c in captioner(px[i:i + batch], steps=STEPS, cfg_scale=CFG_SCALE)]


def summary(rates: dict) -> dict:
    """The numbers the card states and CI checks (fractions)."""
    return {k: rates[k] for k in ("colour_accuracy", "shape_accuracy") if k in rates}


def measure(protocol: Protocol, pipe=None, captioner=None) -> dict:
    """{"t2i": {split: rates}, "i2t": {split: rates}} for whichever models are given."""
    result: dict = {}
    if pipe is not None:
        result["t2i"] = {}
        for split, count in protocol.t2i_prompts.items():
            prompts = prompts_for(split, count)
            result["t2i"][split] = {**summary(E.evaluate_images(t2i_images(pipe, prompts), prompts)[0]),
                                    "prompts": len(prompts)}
    if captioner is not None:
        result["i2t"] = {}
        for split, count in protocol.i2t_images.items():
            scenes = scenes_for(split, count)
            refs = [s.caption for s, _ in scenes]
            captions = captions_for(captioner, scenes)
            result["i2t"][split] = {**summary(E.evaluate_captions(captions, refs)[0]), "images": len(scenes),
                                    "grammatical": float(np.mean([D.parse_caption(c).exact for c in captions]))}
    return result
