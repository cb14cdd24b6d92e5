"""Prompt files -> a list of PromptRecord, in the order images are generated.

Layouts: a text file (one caption per line, blank lines skipped), a COCO Karpathy
`dataset_coco.json` (COCO-30K protocol: one caption per val2014 image, chosen from a seed), or an
MJHQ-30K `meta_data.json` ({image_id: {"prompt": ..., "category": ...}}; the category is kept for
per-category FID). Rule for --num-images: it may not exceed the number of prompts (every image
gets its own prompt; nothing is repeated)."""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

from flowtok_fast.errors import UserError


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    category: str | None = None
    source_id: str | None = None  # the image id in the source file (COCO id, MJHQ id)


def load_prompts(path: str, num_images: int | None = None, seed: int = 0) -> list[PromptRecord]:
    """The first `num_images` prompts of the file (all when None); a UserError names the file."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        records = _from_json(data, path, seed)
    else:
        records = [PromptRecord(line.strip()) for line in text.splitlines() if line.strip()]
    if not records:
        raise UserError(f"{path}: no prompts found: expected one caption per line or a Karpathy/MJHQ JSON file")
    if num_images is not None:
        if num_images > len(records):
            raise UserError(f"--num-images {num_images} exceeds the {len(records)} prompts in {path}: "
                            "each image needs its own prompt (nothing is repeated); lower --num-images")
        records = records[:num_images]
    return records


def _from_json(data, path: str, seed: int) -> list[PromptRecord]:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return coco_30k(data["images"], path, seed)
    if isinstance(data, dict) and all(isinstance(v, dict) and "prompt" in v for v in data.values()):
        return [PromptRecord(str(v["prompt"]), v.get("category"), str(k)) for k, v in data.items()]
    raise UserError(f"{path}: unknown JSON layout: expected a COCO Karpathy file ({{'images': [...]}}) "
                    "or an MJHQ-30K meta_data.json ({id: {'prompt': ..., 'category': ...}})")


def coco_30k(images: list, path: str, seed: int) -> list[PromptRecord]:
    """COCO-30K: the val2014 images in a seeded random order, one of each image's captions (seeded).
    Take the first N for FID-N; the same seed gives the same list on every machine."""
    val = [im for im in images if im.get("filepath") == "val2014" and im.get("sentences")]
    if not val:
        raise UserError(f"{path}: no val2014 images with sentences: expected the Karpathy dataset_coco.json")
    val.sort(key=lambda im: int(im.get("cocoid", im.get("imgid", 0))))
    rng = random.Random(seed)
    rng.shuffle(val)
    return [PromptRecord(rng.choice(im["sentences"])["raw"].strip(), None, str(im.get("cocoid")))
            for im in val]


def write_prompt_list(records: list[PromptRecord], path: str) -> None:
    """The exact prompts used, one JSON object a line (index, prompt, category, source_id); atomic."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"index": i, **asdict(r)}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
