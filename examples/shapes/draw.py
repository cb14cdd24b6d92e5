"""Ground-truth images to caption: `flowtok-fast example shapes --images N --out DIR`.

Draws N scenes of a split with the config's data settings (the shipped i2t model never saw the
`new` split's layouts; `held_out` pairs colours and shapes it never saw together) and writes
DIR/000.png, ... plus DIR/captions.txt (`000.png<TAB>caption`, the caption each was drawn for),
each file atomically. Scene i is a function of (seed, i): the same command draws the same images.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from examples.shapes import data as D
from flowtok_fast.errors import UserError

SPLITS = ("new", "held_out", "train")
SPLIT_SEED = {"train": 1, "new": 2, "held_out": 3}  # make_data's offsets: the example's own evaluation scenes


def draw_images(cfg: dict, count: int, split: str, out: Path) -> list[tuple[str, str]]:
    """(file name, caption) of each image written."""
    if count < 1:
        raise UserError(f"--images {count}: expected an integer >= 1")
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {list(SPLITS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a directory (new or existing)")
    dc, seed = cfg["data"], cfg["seed"]
    splits = D.make_splits(tuple(tuple(c) for c in dc["held_out_combos"]), dc["new_fraction"], seed)
    spec = D.DatasetSpec(split, getattr(splits, split), count, seed * 1000 + SPLIT_SEED[split], cfg["resolution"],
                         tuple(dc["backgrounds"]), float(dc.get("jitter", 1.0)))
    out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(count - 1)))
    written = []
    for i, (scene, image) in enumerate(D.generate(spec)):
        name = f"{i:0{width}d}.png"
        tmp = out / f".{name}.tmp.png"
        Image.fromarray(image).save(tmp)
        os.replace(tmp, out / name)
        written.append((name, scene.caption))
    tmp = out / ".captions.txt.tmp"
    tmp.write_text("".join(f"{name}\t{caption}\n" for name, caption in written))
    os.replace(tmp, out / "captions.txt")
    return written
