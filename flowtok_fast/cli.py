"""`flowtok-fast` command line (also `python -m flowtok_fast`)."""
from __future__ import annotations

import argparse
import os
import importlib
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub: weights come from local files


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", help="a flowtok-fast directory (config.json + model.safetensors)")
    p.add_argument("--checkpoint", help="official generator file, e.g. FlowTok-XL.pth")
    p.add_argument("--tokenizer", help="official image tokenizer file, e.g. FlowTiTok_512.bin")
    p.add_argument("--clip", help="CLIP ViT-L/14-336 weights: OpenAI .pt or open_clip .bin/.safetensors")
    p.add_argument("--random-weights", action="store_true", help="no checkpoints: random weights (noise images)")
    p.add_argument("--config", default="tiny", help="model size for --random-weights: tiny, S, B, L, XL, H")
    p.add_argument("--resolution", type=int, default=256, help="tokenizer resolution for --random-weights")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--fused-kernels", action="store_true", help="use the Triton kernels (CUDA)")
    p.add_argument("--mode", default="eager", choices=("eager", "compile", "graph", "reduce-overhead"),
                   help="sampler: eager, compile (torch.compile), graph (CUDA: the whole loop as one CUDA graph)")


def load_pipeline(args):
    from flowtok_fast.configs import get_config
    from flowtok_fast.pipeline import FlowTokPipeline

    kw = dict(device=args.device, fused_kernels=args.fused_kernels, sampler_mode=args.mode)
    if args.model_dir:
        return FlowTokPipeline.from_pretrained(args.model_dir, **kw)
    official = (args.checkpoint, args.tokenizer, args.clip)
    if any(official):
        if not all(official):
            sys.exit("error: --checkpoint, --tokenizer and --clip must be given together (or use --model-dir)")
        return FlowTokPipeline.from_official(*official, **kw)
    if not args.random_weights:
        sys.exit(
            "error: no weights given. Pass --model-dir DIR, or --checkpoint FlowTok-XL.pth --tokenizer "
            "FlowTiTok_512.bin --clip ViT-L-14-336.pt (local files; nothing is downloaded), or "
            "--random-weights to run with random weights."
        )
    print(f"note: --random-weights: the '{args.config}' model has random weights, so the images are noise by design.")
    cfg = args.config if args.config.lower() == "tiny" else get_config(args.config, args.resolution)
    return FlowTokPipeline.random(cfg, **kw)


def cmd_generate(args) -> None:
    from flowtok_fast.pipeline import image_grid

    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        sys.exit("error: give at least one --prompt or a --prompt-file")
    pipe = load_pipeline(args)
    t0 = time.perf_counter()
    images = []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        images += pipe(batch, steps=args.steps, cfg_scale=args.cfg, seed=args.seed + i,
                       method=args.sampler, grid=args.grid, progress=True)
    dt = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image_grid(images).save(args.out)
    if args.save_individual:
        stem, ext = os.path.splitext(args.out)
        for i, im in enumerate(images):
            im.save(f"{stem}_{i:03d}{ext}")
    print(f"{len(images)} image(s) in {dt:.1f} s ({len(images) / dt:.2f} images/s) -> {args.out}")


def cmd_convert(args) -> None:
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline.from_official(args.checkpoint, args.tokenizer, args.clip, device="cpu")
    pipe.save_pretrained(args.out)
    print(f"wrote {args.out} ({pipe.config.name}, {pipe.config.tokenizer.resolution} px)")


def cmd_caption(args) -> None:
    import json

    from flowtok_fast.captioning import FlowTokCaptioner

    kw = dict(device=args.device, fused_kernels=args.fused_kernels)
    if args.model_dir:
        cap = FlowTokCaptioner.from_pretrained(args.model_dir, **kw)
    elif args.random_weights:
        print("note: --random-weights: captions are gibberish by design.", file=sys.stderr)
        cap = FlowTokCaptioner.random(args.config, **kw)
    else:
        sys.exit("error: pass --model-dir DIR (an image-to-text model directory) or --random-weights")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        sys.exit(f"error: image file(s) not found: {missing}")
    from tqdm import tqdm

    captions = []
    for i in tqdm(range(0, len(args.images), args.batch_size), desc="captioning", disable=len(args.images) <= args.batch_size):
        captions += cap(args.images[i : i + args.batch_size], steps=args.steps, cfg_scale=args.cfg)
    if args.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(args.images, captions)], indent=2))
    else:
        for p, c in zip(args.images, captions):
            print(f"{p}\t{c}")


def cmd_eval_captions(args) -> None:
    import json

    from flowtok_fast.metrics import caption_metrics

    preds = json.load(open(args.predictions))
    refs = json.load(open(args.references))
    # predictions: {id: caption} or [{"image": id, "caption": ...}]; references: {id: [captions]}
    if isinstance(preds, list):
        preds = {p["image"]: p["caption"] for p in preds}
    scores = caption_metrics(preds, refs, spice=not args.no_spice, meteor=not args.no_meteor)
    for note in scores.pop("notes"):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(scores, indent=2))


def cmd_train(args) -> None:
    from flowtok_fast.train import main as train_main

    sys.exit(train_main([args.config_file, *args.overrides]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowtok-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> image")
    _add_model_source(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--prompt-file", help="a text file with one prompt per line")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    g.add_argument("--grid", choices=("reference", "consistent"), default="reference",
                   help="time grid: 'reference' reproduces the published checkpoints' outputs")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--out", default="outputs/grid.png")
    g.add_argument("--save-individual", action="store_true", help="also save each image")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="official checkpoint files -> a flowtok-fast directory")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--tokenizer", required=True)
    c.add_argument("--clip", required=True)
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=cmd_convert)

    cp = sub.add_parser("caption", help="image -> text (the reverse flow)")
    cp.add_argument("images", nargs="+", help="image files")
    cp.add_argument("--model-dir", help="an image-to-text flowtok-fast directory")
    cp.add_argument("--random-weights", action="store_true")
    cp.add_argument("--config", default="tiny")
    cp.add_argument("--steps", type=int, default=20)
    cp.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = off)")
    cp.add_argument("--batch-size", type=int, default=32)
    cp.add_argument("--device", default=None)
    cp.add_argument("--fused-kernels", action="store_true")
    cp.add_argument("--json", action="store_true", help="print JSON instead of tab-separated lines")
    cp.set_defaults(func=cmd_caption)

    ev = sub.add_parser("eval-captions", help="BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE of predictions vs references")
    ev.add_argument("predictions", help="JSON: {id: caption} or the output of `caption --json`")
    ev.add_argument("references", help="JSON: {id: [reference captions]}")
    ev.add_argument("--no-spice", action="store_true")
    ev.add_argument("--no-meteor", action="store_true")
    ev.set_defaults(func=cmd_eval_captions)

    tr = sub.add_parser("train", help="train a FlowTok generator (multi-GPU: torchrun -m flowtok_fast.train)")
    tr.add_argument("config_file", help="YAML recipe, e.g. configs/train/tiny.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 lr=2e-4")
    tr.set_defaults(func=cmd_train)

    # listed for --help only: main() hands `plan ...` to the planner's own parser
    sub.add_parser("plan", help="per-GPU memory and recomputation planner (flowtok-fast plan --help)")
    sub.add_parser("pretokenize", help="image+caption shards -> tokenizer moments shards (pretokenize --help)")
    sub.add_parser("train-tokenizer", help="train the FlowTiTok image tokenizer (train-tokenizer --help)")
    sub.add_parser("coco-karpathy", help="COCO Karpathy split -> webdataset shards + references (coco-karpathy --help)")
    sub.add_parser("index-shards", help="write checked .idx files for webdataset shards (index-shards --help)")
    sub.add_parser("example", help="run an example end to end: `example shapes --help` (captioned shapes, CPU)")
    return parser


PASSTHROUGH = {
    "plan": "flowtok_fast.perf.planner",
    "pretokenize": "flowtok_fast.train.pretokenize",
    "train-tokenizer": "flowtok_fast.train.tokenizer_trainer",
    "coco-karpathy": "flowtok_fast.train.coco",
    "index-shards": "flowtok_fast.train.webdata",
}


def run_shapes_example(argv: list[str]) -> int:
    """examples/shapes lives in the source tree, not in the installed package: find it beside an
    editable install (or the current directory) and say so clearly when it is absent."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "examples" / "shapes" / "run.py").is_file():
            sys.path.insert(0, str(root))
            from examples.shapes.run import main as shapes_main

            return shapes_main(argv)
    raise SystemExit("flowtok-fast example shapes: examples/shapes/ ships with the source tree; install with "
                     "`pip install -e .` from a clone, or run it from the repository root")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # verbs whose module owns its whole argument list (and its --help)
    if argv[:1] and argv[0] in PASSTHROUGH:
        module = importlib.import_module(PASSTHROUGH[argv[0]])
        sys.exit(module.main(argv[1:]) or 0)
    if argv[:2] == ["example", "shapes"]:
        sys.exit(run_shapes_example(argv[2:]))
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
