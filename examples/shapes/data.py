"""Captioned shapes: a deterministic generator of synthetic images and their captions.

A scene is one coloured shape ("a red circle") or two ("a red circle above a blue square") on a
plain background. Every random choice comes from `numpy.random.default_rng(seed)`, so a scene,
its image and its caption depend only on (seed, index). Scenes are written as webdataset
shards: `<key>.png` (the image), `<key>.txt` (the caption) and `<key>.json` (the scene: objects,
boxes, relation), with the `webdataset` package's TarWriter when it is installed, else with
`tarfile` (the same layout). Shards are written to a temporary name and renamed into place.

Prompt splits (by *layout*, i.e. the ordered objects of a scene, so that "A above B" and
"B below A" always fall in the same split):
  - held-out combinations: colour-shape pairs (e.g. "blue triangle") that no training scene has;
  - new prompts: layouts built from seen combinations that no training scene has;
  - train: every other layout.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (12, 12, 12), "grey": (70, 70, 70)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "to the left of", "to the right of")
# the first-mentioned object's slot for each relation; the second object takes the opposite one
_FIRST_SLOT = {"above": "top", "below": "bottom", "to the left of": "left", "to the right of": "right"}
_OPPOSITE = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
# slot centres as fractions of the image size (x, y)
SLOT_CENTRES = {"centre": (0.5, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "left": (0.27, 0.5), "right": (0.73, 0.5)}
AXIS = {"top": "y", "bottom": "y", "left": "x", "right": "x", "centre": None}
DEFAULT_HELD_OUT = (("blue", "triangle"), ("yellow", "circle"), ("red", "square"))

Obj = tuple[str, str]  # (colour, shape)


# ---------------------------------------------------------------- grammar


def caption_of(objects: list[Obj], relation: str | None = None) -> str:
    """'a red circle' or 'a red circle above a blue square'."""
    if len(objects) == 1 and relation is None:
        return f"a {objects[0][0]} {objects[0][1]}"
    if len(objects) != 2 or relation not in RELATIONS:
        raise ValueError(f"a caption has one object, or two and a relation in {RELATIONS}; got {objects}, {relation!r}")
    (c1, s1), (c2, s2) = objects
    return f"a {c1} {s1} {relation} a {c2} {s2}"


_EXACT = re.compile(
    r"^a (\w+) (\w+)(?: (above|below|to the left of|to the right of) a (\w+) (\w+))?$"
)


@dataclass
class Parsed:
    """A caption read back: objects in the order mentioned, the relation, and whether it was an
    exact sentence of the grammar."""

    objects: list[tuple[str | None, str | None]]
    relation: str | None
    exact: bool

    def slots(self) -> dict[str, tuple[str | None, str | None]]:
        """{slot: object}: 'centre' for one object, else top/bottom or left/right."""
        if self.relation is None or len(self.objects) < 2:
            return {"centre": self.objects[0]} if self.objects else {}
        first = _FIRST_SLOT[self.relation]
        return {first: self.objects[0], _OPPOSITE[first]: self.objects[1]}

    def ordered(self) -> list[tuple[str | None, str | None]]:
        """Objects in spatial order: top before bottom, left before right (so 'A above B' and
        'B below A' give the same list)."""
        s = self.slots()
        for a, b in (("top", "bottom"), ("left", "right")):
            if a in s:
                return [s[a], s[b]]
        return [s["centre"]] if s else []


def parse_caption(caption: str) -> Parsed:
    """Read a caption of the grammar; tolerant of generated text: colour and shape words are
    collected in order (a colour pairs with the next shape), the relation by its phrase."""
    text = " ".join(caption.lower().replace(".", " ").split())
    m = _EXACT.match(text)
    if m and m.group(1) in PALETTE and m.group(2) in SHAPES and (
        m.group(3) is None or (m.group(4) in PALETTE and m.group(5) in SHAPES)
    ):
        objs = [(m.group(1), m.group(2))] + ([(m.group(4), m.group(5))] if m.group(3) else [])
        return Parsed(objs, m.group(3), True)
    relation = next((r for r in sorted(RELATIONS, key=len, reverse=True) if f" {r} " in f" {text} "), None)
    if relation is None and " left " in f" {text} ":
        relation = "to the left of"
    elif relation is None and " right " in f" {text} ":
        relation = "to the right of"
    # split at the relation so each side contributes one object
    parts = [text]
    if relation is not None:
        key = {"to the left of": "left", "to the right of": "right"}.get(relation, relation)
        idx = text.find(f" {key} ") if f" {key} " in text else text.find(key)
        parts = [text[:idx], text[idx + len(key) + 1:]]
    objects = []
    for part in parts:
        words = part.split()
        colour = next((w for w in words if w in PALETTE), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour or shape:
            objects.append((colour, shape))
    if relation is not None and len(objects) < 2:
        relation = None
    return Parsed(objects[:2], relation, False)


def equivalent_captions(caption: str) -> list[str]:
    """The caption and its mirror ('A above B' <-> 'B below A'): both describe the same image."""
    p = parse_caption(caption)
    if p.relation is None:
        return [caption]
    mirror = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}
    return [caption, caption_of([p.objects[1], p.objects[0]], mirror[p.relation])]


def canonical_caption(caption: str) -> str:
    """One caption per layout: 'above' and 'to the left of' only."""
    p = parse_caption(caption)
    if p.relation in ("below", "to the right of"):
        return equivalent_captions(caption)[1]
    return caption


# ---------------------------------------------------------------- prompt splits


def all_combos() -> list[Obj]:
    return [(c, s) for c in PALETTE for s in SHAPES]


def layout_of(caption: str) -> tuple:
    """The layout a caption describes: ('centre', obj) or (axis, first obj, second obj)."""
    p = parse_caption(caption)
    if p.relation is None:
        return ("centre", p.objects[0])
    return ("y" if _FIRST_SLOT[p.relation] in ("top", "bottom") else "x", *p.ordered())


def all_captions() -> list[str]:
    combos = all_combos()
    singles = [caption_of([o]) for o in combos]
    pairs = [caption_of([a, b], r) for a in combos for b in combos for r in RELATIONS]
    return singles + pairs


@dataclass(frozen=True)
class Splits:
    train: tuple[str, ...]
    new: tuple[str, ...]  # unseen layouts of seen colour-shape combinations
    held_out: tuple[str, ...]  # captions with at least one held-out combination
    held_out_combos: tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"train": len(self.train), "new": len(self.new), "held_out": len(self.held_out),
                "held_out_combos": [" ".join(c) for c in self.held_out_combos]}


def make_splits(held_out_combos=DEFAULT_HELD_OUT, new_fraction: float = 0.15, seed: int = 0) -> Splits:
    """Deterministic split of every caption of the grammar (see the module docstring). Single
    objects of seen combinations always stay in training."""
    held = tuple(tuple(c) for c in held_out_combos)
    for c in held:
        if c not in all_combos():
            raise ValueError(f"held-out combination {c} is not a colour-shape pair of the grammar")
    train, new, held_out = [], [], []
    pair_layouts = sorted({layout_of(c) for c in all_captions() if layout_of(c)[0] != "centre"})
    rng = np.random.default_rng(seed)
    seen_layouts = [lay for lay in pair_layouts if not any(o in held for o in lay[1:])]
    order = rng.permutation(len(seen_layouts))
    new_layouts = {seen_layouts[i] for i in order[: int(round(new_fraction * len(seen_layouts)))]}
    for cap in all_captions():
        lay = layout_of(cap)
        objs = lay[1:]
        if any(o in held for o in objs):
            held_out.append(cap)
        elif lay in new_layouts:
            new.append(cap)
        else:
            train.append(cap)
    return Splits(tuple(train), tuple(new), tuple(held_out), held)


# ---------------------------------------------------------------- scenes and rendering


@dataclass
class Scene:
    caption: str
    objects: list[dict] = field(default_factory=list)  # {"colour", "shape", "slot", "box": [x0, y0, x1, y1]} (pixels)
    relation: str | None = None
    background: str = "black"

    def to_json(self) -> dict:
        return {"caption": self.caption, "objects": self.objects, "relation": self.relation, "background": self.background}

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(d["caption"], d["objects"], d["relation"], d["background"])


def scene_for(caption: str, rng: np.random.Generator, resolution: int = 32, backgrounds=("black",),
              jitter: float = 1.0) -> Scene:
    """Place the caption's objects: one object large near the centre; two objects smaller, in
    the slots their relation names (top/bottom or left/right), jittered so they never touch.
    `jitter` in [0, 1] scales every random offset and size range around its middle (0: one
    image per caption and background)."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")

    def uniform(lo, hi):
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * jitter
        return rng.uniform(mid - half, mid + half)

    p = parse_caption(caption)
    if not p.exact:
        raise ValueError(f"not a caption of the grammar: {caption!r}")
    slots = p.slots()
    single = len(slots) == 1
    objects = []
    for slot, (colour, shape) in slots.items():
        cx, cy = SLOT_CENTRES[slot]
        if single:
            size = uniform(0.40, 0.55)
            cx, cy = cx + uniform(-0.08, 0.08), cy + uniform(-0.08, 0.08)
        else:
            size = uniform(0.30, 0.36)  # 10-12 px at 32 px: shapes stay legible after a 32 px tokenizer
            along, across = uniform(-0.03, 0.03), uniform(-0.08, 0.08)
            if AXIS[slot] == "y":
                cx, cy = cx + across, cy + along
            else:
                cx, cy = cx + along, cy + across
        half = size * resolution / 2
        x, y = cx * resolution, cy * resolution
        objects.append({"colour": colour, "shape": shape, "slot": slot,
                        "box": [round(x - half, 2), round(y - half, 2), round(x + half, 2), round(y + half, 2)]})
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    return Scene(caption, objects, p.relation, bg)


def render(scene: Scene, resolution: int = 32, supersample: int = 4, colours: dict | None = None,
           shapes: dict | None = None) -> np.ndarray:
    """[H, W, 3] uint8, anti-aliased (drawn at `supersample` x the size, then box-filtered).
    `colours` / `shapes` override an object's colour / shape by index (for wrong-image tests)."""
    s = supersample
    im = Image.new("RGB", (resolution * s, resolution * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for i, obj in enumerate(scene.objects):
        colour = PALETTE[(colours or {}).get(i, obj["colour"])]
        shape = (shapes or {}).get(i, obj["shape"])
        x0, y0, x1, y1 = (v * s for v in obj["box"])
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    if s > 1:
        im = im.resize((resolution, resolution), Image.BOX)
    return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate: `count` scenes whose captions are drawn uniformly from `captions`."""

    name: str
    captions: tuple[str, ...]
    count: int
    seed: int
    resolution: int = 32
    backgrounds: tuple[str, ...] = ("black",)
    jitter: float = 1.0  # scales the random placement and size ranges (scene_for)


def generate(spec: DatasetSpec) -> list[tuple[Scene, np.ndarray]]:
    """Scene i depends only on (seed, i)."""
    out = []
    for i in range(spec.count):
        rng = np.random.default_rng([spec.seed, i])
        caption = spec.captions[int(rng.integers(len(spec.captions)))]
        scene = scene_for(caption, rng, spec.resolution, spec.backgrounds, spec.jitter)
        out.append((scene, render(scene, spec.resolution)))
    return out


# ---------------------------------------------------------------- webdataset shards


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _tar_writer(path: str):
    """(write(sample dict), close()) with webdataset's TarWriter if installed, else tarfile."""
    try:
        import webdataset as wds

        w = wds.TarWriter(path)
        return w.write, w.close, "webdataset"
    except ImportError:
        tf = tarfile.open(path, "w")

        def write(sample: dict) -> None:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                data = data if isinstance(data, bytes) else data.encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tf.addfile(info, io.BytesIO(data))

        return write, tf.close, "tarfile"


def write_shards(samples: list[tuple[Scene, np.ndarray]], out_dir: str | Path, prefix: str, per_shard: int = 2000) -> dict:
    """`<out_dir>/<prefix>-000000.tar`, ... Each shard is written as a hidden temporary file and
    renamed into place when complete. Returns {"shards": [...], "count": n, "writer": ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, writer_name = [], None
    for start in range(0, len(samples), per_shard):
        final = out_dir / f"{prefix}-{start // per_shard:06d}.tar"
        tmp = out_dir / f".{final.name}.tmp"
        write, close, writer_name = _tar_writer(str(tmp))
        try:
            for i, (scene, image) in enumerate(samples[start : start + per_shard]):
                write({
                    "__key__": f"{prefix}_{start + i:08d}",
                    "png": _png_bytes(image),
                    "txt": scene.caption,
                    "json": json.dumps(scene.to_json(), sort_keys=True),
                })
        finally:
            close()
        os.replace(tmp, final)
        shards.append(str(final))
    return {"shards": shards, "count": len(samples), "writer": writer_name}


def read_shards(paths: list[str | Path]) -> list[tuple[Scene, np.ndarray]]:
    """Read shards written by `write_shards` (plain tarfile: no dependency on webdataset)."""
    out = []
    for path in paths:
        groups: dict[str, dict[str, bytes]] = {}
        order = []
        with tarfile.open(path) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = tf.extractfile(member).read()
        for key in order:
            g = groups[key]
            scene = Scene.from_json(json.loads(g["json"]))
            image = np.asarray(Image.open(io.BytesIO(g["png"])).convert("RGB"), dtype=np.uint8)
            out.append((scene, image))
    return out


# ---------------------------------------------------------------- training-side datasets (torch)


class ImageTextDataset:
    """In-memory scenes as the trainers' datasets: len() + batch(indices) -> {"pixels" [B,3,H,W]
    in [0, 1], "ids" [B,77]} (captions tokenised once, with open_clip's CLIP tokenizer)."""

    def __init__(self, samples: list[tuple[Scene, np.ndarray]], captions: list[str] | None = None):
        import torch

        from flowtok_fast.models.text import tokenize

        self.captions = captions if captions is not None else [s.caption for s, _ in samples]
        self.images = torch.from_numpy(np.stack([im for _, im in samples])).permute(0, 3, 1, 2).contiguous()  # uint8
        self.ids = tokenize(self.captions)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices: list[int]) -> dict:
        return {"pixels": self.images[indices].float() / 255.0, "ids": self.ids[indices]}


class LatentTextDataset:
    """Pretokenised samples: {"moments" [B,32,1,77], "ids" [B,77]} for the generator trainer."""

    def __init__(self, moments, ids):
        if len(moments) != len(ids):
            raise ValueError(f"{len(moments)} moments but {len(ids)} captions")
        self.moments, self.ids = moments, ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict:
        return {"moments": self.moments[indices], "ids": self.ids[indices]}
