"""`flowtok-fast evaluate i2t`: caption the COCO Karpathy test split in batches, sharded and
resumable like t2i (one JSON file of captions per shard, written atomically), then score with
flowtok_fast.metrics.caption_metrics beside the paper's numbers."""
from __future__ import annotations

import json
import os

from tqdm import tqdm

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation import distributed as dd
from flowtok_fast.evaluation import shards as sh
from flowtok_fast.evaluation.generation import check_manifest
from flowtok_fast.evaluation.results import PAPER, write_atomic, write_results
from flowtok_fast.evaluation.t2i import writable_folder
from flowtok_fast.validate import BATCH, CFG, COUNT, STEPS


def add_arguments(p) -> None:
    p.add_argument("--model-dir", required=True, help="a flowtok-fast model directory with the captioning parts")
    p.add_argument("--karpathy", required=True, help="the Karpathy split file dataset_coco.json")
    p.add_argument("--images", required=True, help="COCO root holding val2014/ (and train2014/)")
    p.add_argument("--out", required=True, help="evaluation folder (captions/, results.json, results.md)")
    p.add_argument("--split", default="test", help="Karpathy split to caption")
    p.add_argument("--num-images", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--steps", **STEPS, default=None, help="sampling steps (default: the model's recommendation)")
    p.add_argument("--cfg", **CFG, default=None, help="guidance scale (default: the model's recommendation)")
    p.add_argument("--batch-size", **BATCH, default=64)
    p.add_argument("--shard-size", **COUNT, default=500, help="images per shard (the unit of resuming)")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE (slow; needs Stanford CoreNLP files)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java process; slow to start)")
    p.add_argument("--device", default=None)
    p.add_argument("--mode", default="eager", help="sampler mode: auto, eager, compile, graph, reduce-overhead")
    p.add_argument("--no-progress", action="store_true")


def karpathy_split(path: str, root: str, split: str, num: int | None) -> list[dict]:
    """[{id, path, references}] of the split, in file order; every image file checked up front."""
    if not os.path.isfile(path):
        raise UserError(f"--karpathy: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: expected the Karpathy layout {{'images': [{{'split', 'filepath', 'filename', 'sentences'}}]}}")
    items = [{"id": str(im.get("cocoid", im.get("imgid"))), "path": os.path.join(root, im.get("filepath", ""), im["filename"]),
              "references": [s["raw"] for s in im.get("sentences", [])]}
             for im in data["images"] if im.get("split") == split]
    if not items:
        raise UserError(f"{path}: no images in split {split!r}")
    if num is not None:
        if not 1 <= num <= len(items):
            raise UserError(f"--num-images {num}: the {split} split has {len(items)} images: expected 1..{len(items)}")
        items = items[:num]
    missing = [it["path"] for it in items if not os.path.isfile(it["path"])]
    if missing:
        raise UserError(f"--images {root}: {len(missing)} image(s) of the split missing, first {missing[0]}")
    return items


def caption_shards(captioner, items, folder, shard_size, batch_size, opts, rank, world, progress) -> int:
    todo = [s for s in sh.rank_slice(sh.plan_shards(len(items), shard_size), rank, world)
            if not os.path.exists(os.path.join(folder, s.name("png") + ".json"))]
    with tqdm(total=sum(s.stop - s.start for s in todo), unit="img", desc="caption", disable=not progress) as bar:
        for shard in todo:
            captions = {}
            for lo in range(shard.start, shard.stop, batch_size):
                batch = items[lo:min(lo + batch_size, shard.stop)]
                for it, text in zip(batch, captioner([it["path"] for it in batch], **opts)):
                    captions[it["id"]] = text
                bar.update(len(batch))
            write_atomic(os.path.join(folder, shard.name("png") + ".json"), json.dumps(captions, ensure_ascii=False))
    return len(todo)


def run_i2t(args) -> int:
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.deploy.dtype import auto_dtype
    from flowtok_fast.deploy.mode import resolve_mode
    from flowtok_fast.metrics import caption_metrics

    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rank, world = dd.rank_world()
    device = dd.local_device(args.device)
    args.mode, why_mode = resolve_mode(args.mode, device, auto_dtype(device))  # auto -> the mode it picks
    items = karpathy_split(args.karpathy, args.images, args.split, args.num_images)
    print(why_mode)
    captioner = FlowTokCaptioner.from_pretrained(args.model_dir, device=device, sampler_mode=args.mode)
    opts = captioner.sampling_options(steps=args.steps, cfg_scale=args.cfg)  # checked before anything is written
    args.steps, args.cfg = opts.steps, opts.cfg_scale
    print(captioner.sampling.describe(opts))
    out = writable_folder(args.out)  # last: a bad input above leaves nothing behind
    folder = os.path.join(out, "captions")
    settings = {"model_dir": os.path.abspath(args.model_dir), "karpathy": os.path.abspath(args.karpathy),
                "split": args.split, "num_images": len(items), "steps": args.steps, "cfg": args.cfg,
                "shard_size": args.shard_size}
    dd.init(device)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        check_manifest(folder, settings)
        sh.remove_stale_temporaries(folder)
    dd.barrier()
    done = caption_shards(captioner, items, folder, args.shard_size, args.batch_size,
                          {"steps": args.steps, "cfg_scale": args.cfg}, rank, world, not args.no_progress)
    dd.barrier()
    if rank == 0:
        predictions = {}
        for s in sh.plan_shards(len(items), args.shard_size):
            with open(os.path.join(folder, s.name("png") + ".json"), encoding="utf-8") as f:
                predictions.update(json.load(f))
        references = {it["id"]: it["references"] for it in items}
        metrics = caption_metrics(predictions, references, spice=not args.no_spice, meteor=not args.no_meteor)
        write_atomic(os.path.join(out, "captions.json"), json.dumps(predictions, indent=1, ensure_ascii=False))
        names = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
        rows = [(n, 100 * metrics[n] if n in metrics else None, PAPER["i2t"][n]) for n in names]
        write_results(out, {"task": "i2t", "metrics": metrics, "num_images": len(items), "shards_captioned": done,
                            "settings": settings | {"world_size": world}},
                      rows, f"FlowTok image-to-text: COCO Karpathy {args.split} ({len(items)} images), scores x100")
        print(" ".join(f"{n} {v:.1f}" for n, v, _ in rows if v is not None) + f" -> {out}/results.md")
    dd.finish()  # no barrier: other ranks need not wait (gloo's timeout) while rank 0 scores
    return 0
