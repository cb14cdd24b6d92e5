"""`flowtok-fast evaluate t2i`: prompts -> sharded images -> FID (clean-fid protocol, overall and
per MJHQ category) and CLIP score -> results.json / results.md / grid.png. Every input is checked
before anything is generated or written."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation import distributed as dd
from flowtok_fast.evaluation import shards as sh
from flowtok_fast.evaluation.fid_stats import list_images, reference_stats
from flowtok_fast.evaluation.frechet import frechet_distance_to_features, load_stats
from flowtok_fast.evaluation.generation import check_manifest, generate_shards, package_images, pipeline_images
from flowtok_fast.evaluation.inception import FEATURE_DIM, InceptionFeatures
from flowtok_fast.evaluation.prompts import load_prompts, write_prompt_list
from flowtok_fast.evaluation.results import PAPER, prompt_grid, save_png_atomic, write_results
from flowtok_fast.evaluation.scoring import ShardScorer
from flowtok_fast.validate import BATCH, CFG, COUNT, STEPS

GRID_SIZE = 64
DEFAULT_BATCH = 64


def add_arguments(p) -> None:
    p.add_argument("--model-dir", help="a flowtok-fast model directory (config.json + model.safetensors); "
                                       "with --package optional: the package must then come from it")
    p.add_argument("--prompts", required=True, help="captions: one per line, Karpathy dataset_coco.json (COCO-30K) or MJHQ meta_data.json")
    p.add_argument("--reference", required=True, help="reference statistics .npz (mu, sigma) or a folder/.tar of real images")
    p.add_argument("--inception", help="clean-fid's TorchScript inception-2015-12-05.pt (local file; never downloaded)")
    p.add_argument("--clip", help="open_clip weights for CLIP score (optional)")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name of --clip")
    p.add_argument("--num-images", type=int, default=30000, help="at most the number of prompts (one prompt per image)")
    p.add_argument("--out", required=True, help="evaluation folder (images/, results.json, results.md, grid.png)")
    p.add_argument("--steps", **STEPS, default=None, help="sampling steps (default: the model's recommendation; with --package: the package's)")
    p.add_argument("--cfg", **CFG, default=None, help="guidance scale (default: the model's recommendation; with --package: the package's)")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed f(seed, i); also picks COCO-30K captions")
    p.add_argument("--batch-size", **BATCH, default=None,
                   help=f"images per generator call and per Inception batch (default: {DEFAULT_BATCH}; with --package: the package's batch)")
    p.add_argument("--shard-size", **COUNT, default=1000, help="images per shard (the unit of resuming)")
    p.add_argument("--format", choices=sh.FORMATS, default="png", help="shards as PNG folders or tars")
    p.add_argument("--mode", default="eager", help="sampler mode: auto, eager, compile, graph, reduce-overhead (not with --package)")
    p.add_argument("--package", metavar="PKG", help="generate with an exported AOTInductor package (`flowtok-fast export`): "
                                                   "steps, cfg and batch are the package's")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true")


def writable_folder(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"--out {path}: cannot write there ({err.strerror or err})") from None
    return path


def check_reference(reference: str):
    """('stats', (mu, sigma)) for a .npz, ('images', path) for a folder/tar: checked, nothing computed."""
    if reference.endswith(".npz"):
        mu, sigma, _ = load_stats(reference, FEATURE_DIM)
        return "stats", (mu, sigma)
    if not os.path.exists(reference):
        raise UserError(f"--reference {reference}: not found: expected a .npz (mu, sigma) or a folder/.tar of images")
    list_images(reference)
    return "images", reference


def package_options(args) -> torch.device:
    """--package's steps / cfg / batch (from its manifest) put into args, and the device to run it
    on; a conflicting value given on the command line is refused, naming both, before any loading."""
    from flowtok_fast.deploy import manifest as mf

    if args.mode != "eager":
        raise UserError(f"--package runs an exported package: leave out --mode {args.mode}")
    manifest = mf.read(args.package)
    for flag, name, field in (("--steps", "steps", "steps"), ("--cfg", "cfg", "cfg_scale"), ("--batch-size", "batch_size", "batch")):
        given, built = getattr(args, name), manifest.get(field)
        if given is not None and given != built:
            raise UserError(f"{flag} {given}: package {args.package} was built for {field} {built}: "
                            f"leave {flag} out or export a package with {given}")
        setattr(args, name, built)
    built_device = torch.device(manifest.get("device", "cpu"))
    return dd.local_device(args.device) if args.device or built_device.type == "cuda" else torch.device("cpu")


def run_t2i(args) -> int:
    from flowtok_fast.pipeline import FlowTokPipeline

    if args.num_images < 2:
        raise UserError(f"--num-images must be at least 2 for FID, got {args.num_images}")
    if args.package:
        device = package_options(args)
    elif not args.model_dir:
        raise UserError("give --model-dir (a flowtok-fast model directory) or --package (an exported package)")
    else:
        device = dd.local_device(args.device)
        if args.batch_size is None:
            args.batch_size = DEFAULT_BATCH
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rank, world = dd.rank_world()
    inception = InceptionFeatures(args.inception, device, args.batch_size)
    kind, reference = check_reference(args.reference)
    clip = None
    if args.clip:
        from flowtok_fast.evaluation.clip_score import ClipScorer

        clip = ClipScorer(args.clip, args.clip_model, device, args.batch_size)
    records = load_prompts(args.prompts, args.num_images, args.seed)
    package = None
    if args.package:  # refused here if damaged, built with another torch / for another device, or from another model
        from flowtok_fast.loading import load_package

        package = load_package(args.package, device=device, model=args.model_dir)
        make_images = package_images(package)
    else:  # steps / cfg not given: the model's recommendation (recorded below as what ran)
        from flowtok_fast.deploy.dtype import auto_dtype
        from flowtok_fast.deploy.mode import resolve_mode

        args.mode, why_mode = resolve_mode(args.mode, device, auto_dtype(device))  # auto -> the mode it picks
        print(why_mode)
        pipe = FlowTokPipeline.from_pretrained(args.model_dir, device=device, sampler_mode=args.mode)
        opts = pipe.sampling_options(steps=args.steps, cfg_scale=args.cfg, seed=args.seed)
        args.steps, args.cfg = opts.steps, opts.cfg_scale
        print(pipe.sampling.describe(opts))
        make_images = pipeline_images(pipe, opts)
    out = writable_folder(args.out)  # last: a bad input above leaves nothing behind

    images_dir = os.path.join(out, "images")
    settings = {"model_dir": args.model_dir and os.path.abspath(args.model_dir), "prompts": os.path.abspath(args.prompts),
                "num_images": len(records), "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
                "batch_size": args.batch_size, "shard_size": args.shard_size, "format": args.format, "mode": args.mode,
                "package": args.package and os.path.abspath(args.package),
                "package_weights_sha256": package.manifest["model"]["weights_sha256"] if package is not None else None,
                "package_dtype": package.manifest["dtype"] if package is not None else None}
    dd.init(device)
    if rank == 0:
        os.makedirs(images_dir, exist_ok=True)
        check_manifest(images_dir, settings)
        sh.remove_stale_temporaries(images_dir)
        write_prompt_list(records, os.path.join(out, "prompts.jsonl"))
    dd.barrier()
    prompts = [r.prompt for r in records]
    scorer = ShardScorer(images_dir, args.format, inception, prompts, clip)
    all_shards = sh.plan_shards(len(records), args.shard_size)
    mine = sh.rank_slice(all_shards, rank, world)
    t0 = time.perf_counter()
    stats = generate_shards(make_images, records, images_dir, fmt=args.format,
                            shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                            rank=rank, world=world, on_shard=scorer, progress=not args.no_progress)
    stats["shards_rescored"] = scorer.ensure(mine)
    stats["wall_seconds"] = time.perf_counter() - t0
    dd.barrier()
    if rank == 0:
        report(args, out, records, all_shards, scorer, inception, kind, reference, settings, stats, world)
    dd.finish()  # no barrier: other ranks need not wait (gloo's timeout) while rank 0 scores
    return 0


def report(args, out, records, all_shards, scorer, inception, kind, reference, settings, stats, world) -> None:
    scores = scorer.load(all_shards)
    feats = scores["inception"]
    if kind == "images":
        ref = reference_stats(reference, inception, os.path.join(out, "reference_stats.npz"), not args.no_progress)
    else:
        ref = reference
    fid = frechet_distance_to_features(feats, *ref)
    per_category = {}
    categories = sorted({r.category for r in records if r.category})
    for cat in categories:
        idx = [i for i, r in enumerate(records) if r.category == cat]
        sub = os.path.join(reference, cat) if kind == "images" and os.path.isdir(reference) else None
        if len(idx) < 2 or sub is None or not os.path.isdir(sub):
            per_category[cat] = {"fid": None, "images": len(idx),
                                 "note": "needs a reference folder with a sub-folder per category and >= 2 images"}
            continue
        cat_ref = reference_stats(sub, inception, os.path.join(out, f"reference_stats.{cat}.npz"), False)
        per_category[cat] = {"fid": frechet_distance_to_features(feats[idx], *cat_ref), "images": len(idx)}
    clip_mean = float(scores["clip"].mean()) if scores["clip"] is not None else None
    results = {"task": "t2i", "fid": fid, "clip_score": clip_mean, "num_images": len(records),
               "fid_per_category": per_category, "settings": settings | {"reference": os.path.abspath(args.reference),
                                                                       "inception": inception.path, "clip": args.clip,
                                                                       "world_size": world, "protocol": "clean-fid clean"},
               "timing_rank0": stats}
    paper = PAPER["t2i"]["MJHQ-30K FID" if categories else "COCO FID-30K"]
    rows = [("FID", fid, paper), ("CLIP score", clip_mean, {})]
    rows += [(f"FID [{c}]", v["fid"], {}) for c, v in per_category.items()]
    write_results(out, results, rows, f"FlowTok text-to-image: {len(records)} images")
    first = []
    for shard in all_shards:
        if len(first) >= GRID_SIZE:
            break
        first += sh.read_shard(os.path.join(out, "images"), shard, args.format)
    first = first[:GRID_SIZE]
    save_png_atomic(prompt_grid(first, [r.prompt for r in records[:len(first)]]), os.path.join(out, "grid.png"))
    print(f"FID {fid:.3f}" + (f", CLIP score {clip_mean:.2f}" if clip_mean is not None else "") + f" -> {out}/results.md")
