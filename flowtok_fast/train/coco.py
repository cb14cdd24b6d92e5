"""COCO Karpathy split -> webdataset shards (+ a references file for `eval-captions`).

    flowtok-fast coco-karpathy --json dataset_coco.json --images /data/coco --split train --out shards/train
    flowtok-fast coco-karpathy --json dataset_coco.json --images /data/coco --split test --out shards/test \
        --references refs_test.json

`dataset_coco.json` is the standard Karpathy file: {"images": [{"filepath": "val2014",
"filename": "...jpg", "cocoid": 42, "split": "train|restval|val|test", "sentences": [{"raw": ...}]}]}.
Converting once lets training, pretokenisation and DALI all read the same shard format. Train
shards hold one sample per (image, caption) pair; evaluation shards one sample per image (first
caption) — the references file holds all of them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from flowtok_fast.errors import UserError
from flowtok_fast.train.webdata import write_shard

log = logging.getLogger(__name__)
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy(json_path: str, split: str) -> list[dict]:
    """[{'id', 'file' (relative path), 'captions'}] of one split ('train' includes 'restval')."""
    from flowtok_fast.validate import read_json

    if split not in SPLITS:
        raise UserError(f"split must be one of {list(SPLITS)}, got {split!r}")
    data = read_json(json_path, "--json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{json_path} is not a Karpathy dataset file: expected an object with an 'images' list")
    out = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im:
            raise UserError(f"{json_path}: images[{i}] has no 'filename': expected Karpathy entries "
                            '{"filepath", "filename", "cocoid", "split", "sentences"}')
        if im.get("split") not in SPLITS[split]:
            continue
        caps = [s["raw"].strip() for s in im.get("sentences", [])
                if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()]
        out.append({"id": str(im.get("cocoid", im.get("imgid", im["filename"]))),
                    "file": os.path.join(im.get("filepath", ""), im["filename"]), "captions": caps})
    return out


def convert(json_path: str, image_root: str, out_dir: str, split: str, per_shard: int = 1000,
            references: str | None = None) -> dict:
    """Write shards `out_dir/{split}-000000.tar` ...; returns counts (written, missing images...)."""
    entries = read_karpathy(json_path, split)
    pairs = split == "train"
    counts = {"images": 0, "samples": 0, "missing_image": 0, "no_caption": 0, "shards": 0}
    buf, refs = [], {}

    def flush():
        if buf:
            write_shard(Path(out_dir) / f"{split}-{counts['shards']:06d}.tar", buf)
            counts["shards"] += 1
            buf.clear()

    for e in tqdm(entries, desc=f"coco {split}"):
        path = os.path.join(image_root, e["file"])
        if not e["captions"]:
            counts["no_caption"] += 1
            continue
        if not os.path.isfile(path):
            counts["missing_image"] += 1
            continue
        data = Path(path).read_bytes()
        ext = os.path.splitext(path)[1].lstrip(".").lower() or "jpg"
        counts["images"] += 1
        refs[e["id"]] = e["captions"]
        for j, cap in enumerate(e["captions"] if pairs else e["captions"][:1]):
            buf.append({"__key__": f"{e['id']}_{j}" if pairs else e["id"], ext: data, "txt": cap})
            counts["samples"] += 1
            if len(buf) >= per_shard:
                flush()
    flush()
    if references:
        from flowtok_fast.checkpoint import _atomic_write

        _atomic_write(Path(references), lambda tmp: Path(tmp).write_text(json.dumps(refs, indent=1)))
    if counts["missing_image"]:
        log.warning("%d images of split %s were not found under %s (skipped)", counts["missing_image"], split, image_root)
    return counts


def main(argv=None) -> int:
    from flowtok_fast.cli_errors import OneLineParser

    p = OneLineParser(prog="flowtok-fast coco-karpathy", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="dataset_coco.json (Karpathy split)")
    p.add_argument("--images", required=True, help="COCO image root holding train2014/ and val2014/")
    p.add_argument("--split", choices=list(SPLITS), required=True)
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--references", help="also write {image id: [captions]} JSON (for eval-captions)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for label, path in (("--json", args.json), ("--images", args.images)):
        if not os.path.exists(path):
            raise UserError(f"{label} {path} does not exist")
    if args.per_shard < 1:
        p.error(f"--per-shard must be >= 1, got {args.per_shard}")
    counts = convert(args.json, args.images, args.out, args.split, args.per_shard, args.references)
    print(json.dumps(counts))
    return 0
