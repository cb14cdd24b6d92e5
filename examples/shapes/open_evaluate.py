"""Three scores for the open-caption task (open_data.py), over several images of each caption:

- fixed attributes: what the caption fixes is drawn right. Checks per image: colours_open, the shape of
  each object (in the caption's spatial order) and the layout's axis; layout_open, the colour and shape
  of both objects (matched in whichever order fits better); second_open, the first object's colour and
  shape (the object in the slot its relation names) and the axis. Score: checks right / checks.
- clean objects: an image is clean when it has exactly two objects (evaluate.detect's components) and
  each is a solid palette colour: its core's mean within CLEAN_COLOUR_TOL (max over RGB) of the nearest
  palette entry, and at least CLEAN_SOLID of its pixels within the same tolerance of it. Measured at
  2486632 on 48 evaluation-prompt images: data images and the shipped tokenizer's reconstructions of
  them have every object clean (core error <= 0.12, solid share >= 0.59); the average of 8 right
  images of one caption mixes the open objects' colours (error >= 0.19, solid share <= 0.1) and fails.
  tests/test_shapes_open.py checks both sides. Score: clean images / images.
- coverage: of each caption's images, those right in every sense (clean and every fixed attribute
  right) show some values of what the caption leaves open (open_data.OpenCaption.open_value); their
  number of distinct values is divided by what n data images of that caption show on average (uniform
  over K options: K (1 - (1 - 1/K)^n)). Score: the mean of that ratio over captions, capped at 1: the
  data itself scores ~1, a model that always draws the same open value ~1 / 3.6 to 1 / 6.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from examples.shapes import evaluate as E
from examples.shapes.data import AXIS, PALETTE
from examples.shapes.open_data import FIRST_SLOT, FORMS, OpenCaption, parse_open

CLEAN_COLOUR_TOL = 0.15
CLEAN_SOLID = 0.4
_RGB = np.array(list(PALETTE.values()), dtype=np.float64) / 255.0


@dataclass
class OpenImageScore:
    caption: str
    form: str
    fixed_right: int
    fixed_checks: int
    clean: bool
    open_value: object  # None unless the image is clean and every fixed attribute is right

    @property
    def right(self) -> bool:
        return self.open_value is not None


def clean_objects(image: np.ndarray, threshold: float = 0.25, min_area: int = 6) -> list[bool]:
    """Per component (as evaluate.detect finds them): a solid palette colour or not."""
    img = image.astype(np.float64) / 255.0
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.abs(img - np.median(border, axis=0)).max(-1)
    out = []
    for pix in E._components(dist > threshold):
        if len(pix) < min_area:
            continue
        d = dist[pix[:, 0], pix[:, 1]]
        core = pix[d >= 0.5 * d.max()]
        mean = img[core[:, 0], core[:, 1]].mean(0)
        ref = _RGB[int(np.argmin(((_RGB - mean) ** 2).sum(1)))]
        solid = (np.abs(img[pix[:, 0], pix[:, 1]] - ref).max(-1) < CLEAN_COLOUR_TOL).mean()
        out.append(bool(np.abs(ref - mean).max() < CLEAN_COLOUR_TOL and solid >= CLEAN_SOLID))
    return out


def _axis_right(a: E.Detected, b: E.Detected, axis: str) -> bool:
    dx, dy = abs(a.centroid[0] - b.centroid[0]), abs(a.centroid[1] - b.centroid[1])
    return dx > dy if axis == "x" else dy > dx


def _mention_order(objs: list[E.Detected], relation: str, resolution: int) -> list[E.Detected | None]:
    """[first-mentioned, second] by position along the relation's axis; a lone object goes to the slot it is nearer to."""
    first_slot = FIRST_SLOT[relation]
    k = 0 if AXIS[first_slot] == "x" else 1
    spatial = sorted(objs, key=lambda o: o.centroid[k])  # top/left first
    if len(spatial) == 1:
        spatial = [spatial[0], None] if spatial[0].centroid[k] < resolution / 2 else [None, spatial[0]]
    spatial = (spatial + [None, None])[:2]
    return spatial if first_slot in ("top", "left") else spatial[::-1]


def _same(obj: E.Detected | None, want: tuple[str | None, str | None]) -> int:
    """How many of want's given attributes (colour, shape) obj has."""
    if obj is None:
        return 0
    return int(want[0] is not None and obj.colour == want[0]) + int(want[1] is not None and obj.shape == want[1])


def score_open_image(image: np.ndarray, caption: str | OpenCaption) -> OpenImageScore:
    c = caption if isinstance(caption, OpenCaption) else parse_open(caption)
    detected = E.detect(image)
    objs = detected[:2]
    clean = len(detected) == 2 and all(clean_objects(image))
    if c.form == "layout_open":
        orders = [objs, objs[::-1]] if len(objs) == 2 else [objs + [None], [None] + objs] if objs else [[None, None]]
        first, second = max(orders, key=lambda o: _same(o[0], c.objects[0]) + _same(o[1], c.objects[1]))
        right, checks = _same(first, c.objects[0]) + _same(second, c.objects[1]), 4
        slot = None
        if first is not None and second is not None:
            if abs(first.centroid[0] - second.centroid[0]) > abs(first.centroid[1] - second.centroid[1]):
                slot = "left" if first.centroid[0] < second.centroid[0] else "right"
            else:
                slot = "top" if first.centroid[1] < second.centroid[1] else "bottom"
    else:
        first, second = _mention_order(objs, c.relation, image.shape[0])
        axis = AXIS[FIRST_SLOT[c.relation]]
        axis_ok = first is not None and second is not None and _axis_right(first, second, axis)
        right = _same(first, c.objects[0]) + _same(second, c.objects[1]) + int(axis_ok)
        checks = 3  # colours_open: two shapes + axis; second_open: first colour and shape + axis
        slot = FIRST_SLOT[c.relation]
    value = None
    if clean and right == checks:
        value = c.open_value((first.colour, first.shape), (second.colour, second.shape), slot)
    return OpenImageScore(c.text, c.form, right, checks, clean, value)


def expected_distinct(options: int, n: int) -> float:
    """Mean number of distinct values among n uniform draws from `options` values."""
    return options * (1.0 - (1.0 - 1.0 / options) ** n)


def caption_coverage(scores: list[OpenImageScore], options: int) -> float:
    """Distinct open values among one caption's right images / what as many data images show on average."""
    values = {s.open_value for s in scores if s.right}
    return len(values) / expected_distinct(options, len(scores))


def _rates(scores: list[OpenImageScore], by_caption: dict[str, list[OpenImageScore]]) -> dict:
    cover = [caption_coverage(v, len(parse_open(k).options())) for k, v in by_caption.items()]
    return {"images": len(scores), "captions": len(by_caption),
            "fixed_attributes": sum(s.fixed_right for s in scores) / max(sum(s.fixed_checks for s in scores), 1),
            "clean_objects": sum(s.clean for s in scores) / max(len(scores), 1),
            "coverage": min(1.0, float(np.mean(cover))) if cover else 0.0,
            "coverage_uncapped": float(np.mean(cover)) if cover else 0.0,
            "right_images": sum(s.right for s in scores) / max(len(scores), 1)}


def evaluate_open(images: list[np.ndarray], captions: list[str]) -> dict:
    """The three scores (fractions) over all images, and per caption form. Images of one caption are
    grouped by its text: give each caption several images (e.g. 8 seeds) for coverage to mean anything."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    parsed = {c: parse_open(c) for c in set(captions)}
    scores = [score_open_image(im, parsed[c]) for im, c in zip(images, captions)]
    by_caption: dict[str, list[OpenImageScore]] = {}
    for s in scores:
        by_caption.setdefault(s.caption, []).append(s)
    result = _rates(scores, by_caption)
    result["by_form"] = {}
    for form in FORMS:
        sub = {k: v for k, v in by_caption.items() if parsed[k].form == form}
        if sub:
            result["by_form"][form] = _rates([s for v in sub.values() for s in v], sub)
    return result
