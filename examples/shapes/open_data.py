"""Open captions: a variant of the shapes task whose captions leave attributes open, so each caption
has many right images and a text-to-image model must pick one from the text latent's noise (its
flow is curved; issue 22's testbed for few-step students).

Three caption forms, in the grammar's words only (the shipped frozen CLIP keeps only their rows):
  - colours_open: "a circle above a square"      both colours open (4 seen colours per shape: 16 pairs)
  - layout_open:  "a red circle a blue square"   the relation open (first object top/bottom/left/right: 4)
  - second_open:  "a red circle above"           the second object open (any of the 12 seen combinations)
An image is drawn by completing the caption at random (uniformly over the options) into a caption of
the grammar and placing it with `data.scene_for`, so the images are the same kind as the base task's
(the shipped tokenizer encodes and decodes them). Only the 12 colour-shape combinations seen by the
shipped tokenizer are used (never blue triangle, yellow circle, red square).

Splits by *group* (what a caption fixes, mirrors together: "a circle above a square" and "a square
below a circle"; "A B" and "B A"): a quarter of each form's groups are evaluation groups, never in
training; one caption per evaluation group is an evaluation prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from examples.shapes.data import (DEFAULT_HELD_OUT, PALETTE, RELATIONS, SHAPES, Scene, all_combos, caption_of,
                                  render, scene_for)

FORMS = ("colours_open", "layout_open", "second_open")
SEEN = tuple(c for c in all_combos() if c not in DEFAULT_HELD_OUT)  # the 12 combinations the tokenizer trained on
MIRROR = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}
FIRST_SLOT = {"above": "top", "below": "bottom", "to the left of": "left", "to the right of": "right"}
EVAL_FRACTION = 0.25
JITTER = 0.25  # the default config's: the shipped tokenizer trained at it

_REL = "|".join(RELATIONS)
_C, _S = "|".join(PALETTE), "|".join(SHAPES)
_PATTERNS = {
    "colours_open": re.compile(rf"^a ({_S}) ({_REL}) a ({_S})$"),
    "layout_open": re.compile(rf"^a ({_C}) ({_S}) a ({_C}) ({_S})$"),
    "second_open": re.compile(rf"^a ({_C}) ({_S}) ({_REL})$"),
}


@dataclass(frozen=True)
class OpenCaption:
    """What a caption fixes: its objects in the order mentioned ((colour | None, shape | None)) and the
    relation (None: open)."""

    text: str
    form: str
    objects: tuple[tuple[str | None, str | None], ...]
    relation: str | None

    def options(self) -> list[tuple]:
        """Every completion, equally likely: (first object, second object, relation) of the grammar."""
        (c1, s1), (c2, s2) = self.objects
        if self.form == "colours_open":
            return [((a, s1), (b, s2), self.relation) for a in PALETTE for b in PALETTE if (a, s1) in SEEN and (b, s2) in SEEN]
        if self.form == "layout_open":
            return [((c1, s1), (c2, s2), r) for r in RELATIONS]
        return [((c1, s1), o, self.relation) for o in SEEN]

    def open_value(self, first: tuple[str, str], second: tuple[str, str], first_slot: str):
        """What the caption leaves open, of one image: both colours, the first object's slot, or the second object."""
        if self.form == "colours_open":
            return (first[0], second[0])
        if self.form == "layout_open":
            return first_slot
        return tuple(second)


def parse_open(text: str) -> OpenCaption:
    for form, pattern in _PATTERNS.items():
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groups()
        if form == "colours_open":
            return OpenCaption(text, form, ((None, g[0]), (None, g[2])), g[1])
        if form == "layout_open":
            return OpenCaption(text, form, ((g[0], g[1]), (g[2], g[3])), None)
        return OpenCaption(text, form, ((g[0], g[1]), (None, None)), g[2])
    raise ValueError(f"not an open caption: {text!r} (forms: 'a circle above a square', 'a red circle a blue square', "
                     f"'a red circle above')")


def open_caption(form: str, first, second, relation: str | None) -> str:
    if form == "colours_open":
        return f"a {first[1]} {relation} a {second[1]}"
    if form == "layout_open":
        return f"a {first[0]} {first[1]} a {second[0]} {second[1]}"
    return f"a {first[0]} {first[1]} {relation}"


def all_open_captions() -> dict[str, list[str]]:
    """{form: captions}: 36 colours_open (3 x 3 shapes x 4 relations), 132 layout_open (ordered pairs of
    two different seen combinations: with two equal objects the slot could not be read back), 48 second_open."""
    return {
        "colours_open": [open_caption("colours_open", (None, a), (None, b), r) for a in SHAPES for b in SHAPES for r in RELATIONS],
        "layout_open": [open_caption("layout_open", a, b, None) for a in SEEN for b in SEEN if a != b],
        "second_open": [open_caption("second_open", a, None, r) for a in SEEN for r in RELATIONS],
    }


def group_of(text: str) -> tuple:
    """Captions with the same meaning share a group: mirrored relations, and either order of a layout_open pair."""
    c = parse_open(text)
    if c.form == "colours_open":
        (_, a), (_, b) = c.objects
        rel = c.relation
        if rel in ("below", "to the right of"):
            a, b, rel = b, a, MIRROR[rel]
        return (c.form, a, rel, b)
    if c.form == "layout_open":
        return (c.form, *sorted(c.objects))
    return (c.form, c.objects[0], c.relation)


@dataclass(frozen=True)
class OpenSplits:
    train: tuple[str, ...]
    eval: tuple[str, ...]  # one caption per evaluation group; no caption of these groups is in train

    def to_dict(self) -> dict:
        forms = lambda caps: {f: sum(parse_open(c).form == f for c in caps) for f in FORMS}
        return {"train": len(self.train), "eval": len(self.eval), "train_by_form": forms(self.train), "eval_by_form": forms(self.eval)}


def make_open_splits(seed: int = 0, eval_fraction: float = EVAL_FRACTION) -> OpenSplits:
    rng = np.random.default_rng(seed + 22)
    train, evals = [], []
    for form, captions in all_open_captions().items():
        groups: dict[tuple, list[str]] = {}
        for c in captions:
            groups.setdefault(group_of(c), []).append(c)
        keys = sorted(groups)
        held = {keys[i] for i in rng.permutation(len(keys))[: int(round(eval_fraction * len(keys)))]}
        for k in keys:
            if k in held:
                evals.append(groups[k][int(rng.integers(len(groups[k])))])
            else:
                train += groups[k]
    return OpenSplits(tuple(train), tuple(evals))


def complete(text: str, rng: np.random.Generator) -> tuple[str, tuple]:
    """A caption of the grammar that fits the open caption, drawn uniformly over its options."""
    options = parse_open(text).options()
    first, second, relation = options[int(rng.integers(len(options)))]
    return caption_of([first, second], relation), (first, second, relation)


def open_scene(text: str, rng: np.random.Generator, resolution: int = 32, jitter: float = JITTER) -> Scene:
    """A scene for an open caption: completed, placed by `scene_for`, then given the open caption."""
    full, _ = complete(text, rng)
    scene = scene_for(full, rng, resolution, ("black",), jitter)
    scene.caption = text
    return scene


def scene_open_value(scene: Scene):
    """The open value of a drawn scene (its objects are in the order the completed caption mentions them)."""
    first, second = scene.objects
    return parse_open(scene.caption).open_value((first["colour"], first["shape"]), (second["colour"], second["shape"]),
                                                first["slot"])


def generate_open(captions: list[str] | tuple[str, ...], count: int, seed: int, resolution: int = 32,
                  jitter: float = JITTER, by_form: bool = True) -> list[tuple[Scene, np.ndarray]]:
    """Scene i depends only on (seed, i). by_form: the form first (uniformly), then a caption of it, so
    the 132 layout_open captions do not outweigh the others."""
    forms: dict[str, list[str]] = {}
    for c in captions:
        forms.setdefault(parse_open(c).form, []).append(c)
    names = sorted(forms)
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        if by_form:
            pool = forms[names[int(rng.integers(len(names)))]]
            text = pool[int(rng.integers(len(pool)))]
        else:
            text = captions[int(rng.integers(len(captions)))]
        scene = open_scene(text, rng, resolution, jitter)
        out.append((scene, render(scene, resolution)))
    return out


def samples_of(text: str, n: int, seed: int, resolution: int = 32, jitter: float = JITTER) -> list[tuple[Scene, np.ndarray]]:
    """n data images of one caption (the data's own spread, for the coverage reference)."""
    import zlib

    out = []
    for i in range(n):  # each caption its own stream (crc32: the same on every machine)
        scene = open_scene(text, np.random.default_rng([seed, zlib.crc32(text.encode()), i]), resolution, jitter)
        out.append((scene, render(scene, resolution)))
    return out


def write_prompt_file(path, prompts) -> None:
    """One prompt per line (the layout `flowtok-fast evaluate` and `distill` read)."""
    from pathlib import Path

    Path(path).write_text("".join(f"{p}\n" for p in prompts))


__all__ = ["FORMS", "SEEN", "OpenCaption", "parse_open", "all_open_captions", "make_open_splits", "generate_open",
           "samples_of", "scene_open_value", "complete", "open_scene", "write_prompt_file"]
