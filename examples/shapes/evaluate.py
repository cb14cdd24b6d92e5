"""A deterministic evaluator: does an image show what its caption says? And a caption scorer.

Images: the background colour is the median of the border pixels; a pixel is foreground when it
differs from the background by more than `threshold` (max over RGB, in [0, 1]); 4-connected
foreground components of at least `min_area` pixels are the objects. Each object's colour is the
palette entry nearest (RGB) to the mean of its core pixels (those at least half as far from the
background as the component's farthest pixel, i.e. at least half covered), its shape, from the
same core mask:
  - triangle when its rows get wider downwards (mean width of the top third < 0.5 x that of
    the bottom third: the grammar's triangles stand upright),
  - else square when it fills more than 0.9 of its bounding box, else circle (pi/4 = 0.785).
Objects are matched to the caption by position: one object -> the largest component; two ->
the two largest, ordered top-to-bottom ("above"/"below") or left-to-right ("left"/"right"), and
compared with the caption's objects in the same spatial order. A missing object counts wrong.

Captions (image-to-text): the generated caption is parsed with the grammar (tolerantly) and its
objects, in spatial order, are compared with the reference scene's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from examples.shapes.data import AXIS, PALETTE, SHAPES, parse_caption

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float64) / 255.0


@dataclass
class Detected:
    colour: str
    shape: str
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    fill: float
    taper: float  # top-third width / bottom-third width


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (row, col) indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pix = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pix.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        comps.append(np.array(pix))
    return comps


def classify_shape(pix: np.ndarray) -> tuple[str, float, float]:
    """(shape, fill ratio, taper) of one component's pixels [(row, col)]."""
    rows, cols = pix[:, 0], pix[:, 1]
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    hgt, wid = r1 - r0 + 1, c1 - c0 + 1
    fill = len(pix) / float(hgt * wid)
    widths = np.bincount(rows - r0, minlength=hgt).astype(np.float64)
    third = max(1, hgt // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1e-9)
    if taper < 0.5:
        return "triangle", fill, taper
    return ("square" if fill > 0.9 else "circle"), fill, taper


def detect(image: np.ndarray, threshold: float = 0.25, min_area: int = 6) -> list[Detected]:
    """Objects in an image [H, W, 3] (uint8, or float in [0, 1]), largest first."""
    img = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.abs(img - bg).max(-1)
    out = []
    for pix in _components(dist > threshold):
        if len(pix) < min_area:
            continue
        d = dist[pix[:, 0], pix[:, 1]]
        core = pix[d >= 0.5 * d.max()]
        mean = img[core[:, 0], core[:, 1]].mean(0)
        colour = _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - mean) ** 2).sum(1)))]
        shape, fill, taper = classify_shape(core)  # the half-coverage mask: true edges
        out.append(Detected(colour, shape, len(pix), (float(pix[:, 1].mean()), float(pix[:, 0].mean())), fill, taper))
    return sorted(out, key=lambda o: -o.area)


def _expected(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """The caption's objects in spatial order and the axis ('y', 'x' or None for one object)."""
    p = parse_caption(caption)
    if not p.exact:
        raise ValueError(f"not a caption of the grammar: {caption!r}")
    slots = p.slots()
    axis = AXIS[next(iter(slots))] if len(slots) == 2 else None
    return p.ordered(), axis


def match(detected: list[Detected], caption: str, resolution: int) -> list[Detected | None]:
    """One detected object (or None) per caption object, in the caption's spatial order."""
    expected, axis = _expected(caption)
    if axis is None:
        return [detected[0] if detected else None]
    k = 0 if axis == "x" else 1
    top = sorted(detected[:2], key=lambda o: o.centroid[k])
    if len(top) == 2:
        return top
    if len(top) == 1:  # one object found: it fills the slot it is nearer to
        return [top[0], None] if top[0].centroid[k] < resolution / 2 else [None, top[0]]
    return [None, None]


@dataclass
class ImageScore:
    caption: str
    objects: int
    colour_correct: int
    shape_correct: int
    both_correct: int
    count_correct: bool  # as many components as objects
    all_correct: bool  # every object right and no extra component
    detected: list[dict]


def score_image(image: np.ndarray, caption: str, **kw) -> ImageScore:
    detected = detect(image, **kw)
    expected, _ = _expected(caption)
    got = match(detected, caption, image.shape[0])
    colour = sum(g is not None and g.colour == e[0] for g, e in zip(got, expected))
    shape = sum(g is not None and g.shape == e[1] for g, e in zip(got, expected))
    both = sum(g is not None and (g.colour, g.shape) == tuple(e) for g, e in zip(got, expected))
    count = len(detected) == len(expected)
    return ImageScore(caption, len(expected), colour, shape, both, count, count and both == len(expected),
                      [asdict(d) for d in detected])


def _rates(scores: list, n_key: str = "objects") -> dict:
    n_obj = sum(getattr(s, n_key) for s in scores)
    if not scores:
        return {"images": 0}
    return {
        "images": len(scores),
        "objects": n_obj,
        "colour_accuracy": sum(s.colour_correct for s in scores) / max(n_obj, 1),
        "shape_accuracy": sum(s.shape_correct for s in scores) / max(n_obj, 1),
        "object_accuracy": sum(s.both_correct for s in scores) / max(n_obj, 1),
        "count_accuracy": sum(s.count_correct for s in scores) / len(scores),
        "image_accuracy": sum(s.all_correct for s in scores) / len(scores),
    }


def evaluate_images(images: list[np.ndarray], captions: list[str], **kw) -> tuple[dict, list[ImageScore]]:
    """Accuracy of images against their captions: colour / shape / both per object, object
    count and everything-right per image."""
    scores = [score_image(im, cap, **kw) for im, cap in zip(images, captions)]
    return _rates(scores), scores


# ---------------------------------------------------------------- captions (image-to-text)


@dataclass
class CaptionScore:
    caption: str
    reference: str
    objects: int
    colour_correct: int
    shape_correct: int
    both_correct: int
    count_correct: bool  # as many objects mentioned as in the reference
    all_correct: bool  # same layout: objects, order and relation axis
    grammatical: bool


def score_caption(caption: str, reference: str) -> CaptionScore:
    """Colour and shape words of a generated caption against the reference, object by object in
    spatial order (so 'a blue square below a red circle' matches 'a red circle above a blue square')."""
    ref = parse_caption(reference)
    got = parse_caption(caption)
    exp, have = ref.ordered(), got.ordered()
    have = have + [(None, None)] * (len(exp) - len(have))
    colour = sum(h[0] == e[0] for h, e in zip(have, exp))
    shape = sum(h[1] == e[1] for h, e in zip(have, exp))
    both = sum(tuple(h) == tuple(e) for h, e in zip(have, exp))
    same_axis = set(got.slots()) == set(ref.slots())
    count = len(got.objects) == len(exp)
    return CaptionScore(caption, reference, len(exp), colour, shape, both, count,
                        count and same_axis and both == len(exp), got.exact)


def evaluate_captions(captions: list[str], references: list[str]) -> tuple[dict, list[CaptionScore]]:
    scores = [score_caption(c, r) for c, r in zip(captions, references)]
    rates = _rates(scores)
    rates["layout_accuracy"] = rates.pop("image_accuracy", 0.0)
    rates["grammatical"] = sum(s.grammatical for s in scores) / max(len(scores), 1)
    return rates, scores


__all__ = ["detect", "classify_shape", "score_image", "evaluate_images", "score_caption", "evaluate_captions", "SHAPES"]


def latent_statistics(moments, captions: list[str], norm) -> dict:
    """How the tokenizer's latents spread, over the training images' posterior moments [N, 32, 1, 77]:
    the raw means' std overall and across images (per element, averaged) and the posterior noise's
    std; and `caption_explained_variance`, the share of the flow-space latents' variance across
    images (each element standardised by `norm`, the fitted LatentNorm) that the caption accounts
    for: 1 - within-caption sum of squares / total sum of squares, a caption and its mirror
    ("A above B", "B below A") counted as one."""
    import torch

    from examples.shapes.data import canonical_caption

    mean, logvar = moments.double().chunk(2, dim=1)
    x = norm.to_flow(mean).double().flatten(1)  # [N, 77 * 16]
    groups = {}
    for i, cap in enumerate(captions):
        groups.setdefault(canonical_caption(cap), []).append(i)
    label = torch.empty(len(captions), dtype=torch.long)
    for g, idx in enumerate(groups.values()):
        label[idx] = g
    centroids = torch.zeros(len(groups), x.shape[1], dtype=x.dtype).index_add_(0, label, x)
    centroids /= torch.bincount(label, minlength=len(groups)).to(x.dtype)[:, None]
    within = (x - centroids[label]).square().sum()
    total = (x - x.mean(0)).square().sum()
    return {"raw_std_overall": float(mean.std()), "raw_std_across_images": float(mean.std(0).mean()),
            "posterior_noise_std": float(torch.exp(0.5 * logvar.clamp(-30.0, 20.0)).mean()),
            "caption_explained_variance": float(1 - within / total), "captions": len(groups)}
