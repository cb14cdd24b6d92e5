"""`flowtok-fast` command line (also `python -m flowtok_fast`).

Exit codes: 0 done; 1 `caption`: some images could not be read (each is reported, the others are
captioned); 2 bad input: one line `flowtok-fast VERB: error: ...` on stderr (`--debug` or
FLOWTOK_DEBUG=1 shows the traceback instead); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from flowtok_fast.cli_errors import OneLineParser, print_error, run, take_debug_flag
from flowtok_fast.errors import UserError
from flowtok_fast.validate import (BATCH, CFG, MAX_IMAGES, STEPS, check_fused_kernels, check_image, check_output_dir,
                                   image_output_format, int_arg, read_prompt_file, resolve_device, save_image)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub: weights come from local files

EXIT_SOME_FAILED = 1


# ---------------------------------------------------------------- argument types: range checks at parse time
# (with STEPS, CFG, BATCH: validate.py, where the limits every verb shares live)

_count = int_arg(1)
_seed = int_arg(0)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' where a default means something (not for None or off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_count, default=None,
                   help="torch CPU threads (default: torch's choice, the number of cores; on a busy machine 1 can "
                        "be much faster)")


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on every CPU (the same images whatever the CPU; bf16 there "
                        "is opt-in, faster with avx512_bf16 or AMX); the choice is printed")


def resolve_dtype(args):
    """--dtype -> (torch dtype, the line saying why), printed once the model has loaded."""
    from flowtok_fast.deploy.dtype import resolve_dtype as resolve

    return resolve(args.dtype, resolve_device(args.device))


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", help="a flowtok-fast directory (config.json + model.safetensors), from "
                                       "`flowtok-fast convert` or `flowtok-fast export-model`")
    p.add_argument("--checkpoint", help="official generator file, e.g. FlowTok-XL.pth")
    p.add_argument("--tokenizer", help="official image tokenizer file, e.g. FlowTiTok_512.bin")
    p.add_argument("--clip", help="CLIP ViT-L/14-336 weights: OpenAI .pt or open_clip .bin/.safetensors")
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoints: random weights (checks the install; the image is meaningless)")
    p.add_argument("--config", default="tiny", help="model size for --random-weights: tiny, S, B, L, XL, H")
    p.add_argument("--resolution", type=int, default=256, help="tokenizer resolution for --random-weights (S..H)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--fused-kernels", action="store_true", help="use the Triton kernels (CUDA)")
    _add_mode(p)
    _add_threads(p)


def _add_mode(p) -> None:
    p.add_argument("--mode", default="eager", choices=("auto", "eager", "compile", "graph", "reduce-overhead"),
                   help="sampler: eager, compile (torch.compile; on CPU with frozen weights), graph (CUDA: the whole "
                        "loop as one CUDA graph), auto (the fastest for this device and dtype, printed)")


# ---------------------------------------------------------------- verbs


DEFAULT_BATCH = 16  # prompts per forward; steps, cfg, sampler and grid default to the model's recommendation


def load_pipeline(args):
    from flowtok_fast.deploy.mode import resolve_mode

    kw = dict(device=args.device, fused_kernels=args.fused_kernels)
    kw["dtype"], why = resolve_dtype(args)
    kw["sampler_mode"], why_mode = resolve_mode(args.mode, resolve_device(args.device), kw["dtype"])
    pipe = load_model_source(args, **kw)
    print(why)
    if args.mode == "auto":
        print(why_mode)
    return pipe


def load_model_source(args, **kw):
    """The pipeline the model options name (--model-dir | official files | --random-weights)."""
    from flowtok_fast.loading import load_text_to_image

    if args.random_weights and not (args.model_dir or args.checkpoint):
        print(f"note: --random-weights: the '{args.config}' model is untrained, so the image means nothing "
              "(its flow moves, so every stage runs)")
    return load_text_to_image(args.model_dir, args.checkpoint, args.tokenizer, args.clip,
                              args.config if args.random_weights else None, args.resolution, **kw)


def cmd_generate(args) -> None:
    from flowtok_fast.pipeline import image_grid

    apply_threads(args.threads)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file")
    if len(prompts) > MAX_IMAGES:  # every image is kept for the grid
        raise UserError(f"{len(prompts)} prompts: expected at most {MAX_IMAGES} (one grid); `flowtok-fast evaluate t2i` "
                        "makes more, in shards")
    fmt = image_output_format(args.out)  # before any model is loaded or image sampled
    device = resolve_device(args.device)
    if args.fused_kernels and not args.package:
        check_fused_kernels(device, "--fused-kernels")
    options = dict(steps=args.steps, cfg_scale=args.cfg, method=args.sampler, grid=args.grid)
    if args.package:
        pipe = load_package(args)
        batch = pipe.batch  # None options: the package's own; a different value is refused, saying which
    else:  # options not given: the model's recommendation (its config.json 'sampling'), printed
        pipe, batch = load_pipeline(args), args.batch_size or DEFAULT_BATCH
        opts = pipe.sampling_options(**options)
        print(pipe.sampling.describe(opts))
        options = dict(steps=opts.steps, cfg_scale=opts.cfg_scale, method=opts.method, grid=opts.grid, progress=True)
    t0 = time.perf_counter()
    images = []
    for i in range(0, len(prompts), batch):  # a prompt over 77 tokens: a warning line, from pipe()
        images += pipe(prompts[i : i + batch], seed=args.seed + i, **options)
    dt = time.perf_counter() - t0
    save_image(image_grid(images), args.out, fmt)
    if args.save_individual:
        stem, ext = os.path.splitext(args.out)
        for i, im in enumerate(images):
            save_image(im, f"{stem}_{i:03d}{ext}", fmt)
    print(f"{len(images)} image(s) in {dt:.1f} s ({len(images) / dt:.2f} images/s) -> {args.out}")


def load_package(args):
    other = [flag for flag, given in (("--model-dir", args.model_dir), ("--checkpoint", args.checkpoint),
                                      ("--random-weights", args.random_weights), ("--fused-kernels", args.fused_kernels),
                                      ("--mode", args.mode != "eager")) if given]
    if other:
        raise UserError(f"--package runs an exported package: leave out {', '.join(other)}")
    from flowtok_fast.loading import load_package as load

    apply_threads(args.threads)
    return load(args.package, batch=args.batch_size, device=args.device, dtype=None if args.dtype == "auto" else args.dtype)


def cmd_convert(args) -> None:
    from flowtok_fast.pipeline import FlowTokPipeline

    check_output_dir(args.out)  # before the (slow) conversion
    pipe = FlowTokPipeline.from_official(args.checkpoint, args.tokenizer, args.clip, device="cpu")
    pipe.save_pretrained(args.out)
    print(f"wrote {args.out} ({pipe.config.name}, {pipe.config.tokenizer.resolution} px)")


def cmd_caption(args) -> int:
    """Every image is checked first; a bad one is reported and skipped, the others are captioned."""
    import json

    if not args.model_dir and not args.random_weights:
        raise UserError("pass --model-dir DIR (an image-to-text model: `flowtok-fast export-model` of a "
                        "direction=i2t training run, or the shapes example's i2t/model) or --random-weights")
    failed = 0

    def usable(paths, check):
        nonlocal failed
        kept = []
        for p in paths:
            try:
                kept.append((p, check(p)))
            except UserError as err:
                print_error("caption", err)
                failed += 1
        return kept

    good = [p for p, _ in usable(args.images, check_image)]  # headers only, before torch is even imported
    if not good:
        return 2
    import torch
    from tqdm import tqdm

    from flowtok_fast.captioning import FlowTokCaptioner, load_image
    from flowtok_fast.deploy.mode import resolve_mode

    apply_threads(args.threads)
    device = resolve_device(args.device)
    if args.fused_kernels:
        check_fused_kernels(device, "--fused-kernels")
    dtype, why = resolve_dtype(args)
    mode, why_mode = resolve_mode(args.mode, device, dtype)
    kw = dict(device=args.device, fused_kernels=args.fused_kernels, dtype=dtype, sampler_mode=mode)
    if args.model_dir:
        cap = FlowTokCaptioner.from_pretrained(args.model_dir, **kw)
    else:
        print(f"note: --random-weights: the '{args.config}' model is untrained: its captions are gibberish (this "
              "checks the install)", file=sys.stderr)
        cap = FlowTokCaptioner.random(args.config, flowing=True, **kw)
    print(why, file=sys.stderr)  # stdout holds the captions (or JSON)
    if args.mode == "auto":
        print(why_mode, file=sys.stderr)
    opts = cap.sampling_options(steps=args.steps, cfg_scale=args.cfg)  # not given: the model's recommendation
    print(cap.sampling.describe(opts), file=sys.stderr)
    resolution = cap.config.tokenizer.resolution
    results = []
    for i in tqdm(range(0, len(good), args.batch_size), desc="captioning", disable=len(good) <= args.batch_size):
        batch = usable(good[i : i + args.batch_size], lambda p: load_image(p, resolution))
        if batch:
            captions = cap(torch.stack([px for _, px in batch]), steps=opts.steps, cfg_scale=opts.cfg_scale,
                           method=opts.method, grid=opts.grid)
            results += [(p, c) for (p, _), c in zip(batch, captions)]
    if args.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in results], indent=2))
    else:
        for p, c in results:
            print(f"{p}\t{c}")
    if failed:
        print(f"flowtok-fast caption: {failed} of {len(args.images)} image(s) could not be read (above); "
              f"{len(results)} captioned", file=sys.stderr)
        return EXIT_SOME_FAILED if results else 2
    return 0


def cmd_eval_captions(args) -> None:
    import json

    from flowtok_fast.metrics import caption_metrics, predictions_by_id
    from flowtok_fast.validate import read_json

    preds = predictions_by_id(read_json(args.predictions, "predictions"), args.predictions)
    refs = read_json(args.references, "references")
    scores = caption_metrics(preds, refs, spice=not args.no_spice, meteor=not args.no_meteor)
    for note in scores.pop("notes"):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(scores, indent=2))


def cmd_train(args) -> int:
    from flowtok_fast.train import main as train_main

    apply_threads(args.threads)
    return train_main([args.config_file, *args.overrides])


# ---------------------------------------------------------------- the parser

PASSTHROUGH = {  # verbs whose module owns its whole argument list (and its --help)
    "plan": "flowtok_fast.perf.planner",
    "pretokenize": "flowtok_fast.train.pretokenize",
    "train-tokenizer": "flowtok_fast.train.tokenizer_trainer",
    "coco-karpathy": "flowtok_fast.train.coco",
    "index-shards": "flowtok_fast.train.webdata",
    "export-model": "flowtok_fast.train.export_model",
    "evaluate": "flowtok_fast.evaluation.cli",
    "fid-stats": "flowtok_fast.evaluation.fid_stats",
    "export": "flowtok_fast.deploy.export",
    "tokenize": "flowtok_fast.deploy.tokenize_ids",
    "serve": "flowtok_fast.serve.main",
    "distill": "flowtok_fast.train.distill",
}
PASSTHROUGH_HELP = {
    "plan": "per-GPU memory and recomputation planner (plan --help)",
    "pretokenize": "image+caption shards -> tokenizer moments shards (pretokenize --help)",
    "train-tokenizer": "train the FlowTiTok image tokenizer (train-tokenizer --help; also takes --threads N)",
    "coco-karpathy": "COCO Karpathy split -> webdataset shards + references (coco-karpathy --help)",
    "index-shards": "write checked .idx files for webdataset shards (index-shards --help)",
    "export-model": "a training checkpoint -> a model directory for generate/caption (export-model --help)",
    "evaluate": "the paper's benchmarks: evaluate t2i (FID, CLIP score) | evaluate i2t (COCO Karpathy) (evaluate --help)",
    "fid-stats": "reference FID statistics (mu, sigma) of a folder/tar of real images (fid-stats --help)",
    "export": "a model -> an AOTInductor package directory, loaded without compiling (export --help)",
    "tokenize": "prompts -> CLIP token ids (+ seeded noise) for the C++ runner flowtok-run (tokenize --help)",
    "serve": "batching HTTP server: images, captions, /metrics, a web page (serve --help)",
    "distill": "a model directory -> a few-step student with guidance built in (distill --help; also takes --threads N)",
}
THREADS_FOR_MODULE = ("train-tokenizer", "distill")  # --threads is taken here: their parsers do not know it


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flowtok-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="every verb also takes --debug (a traceback instead of a one-line error)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    g = sub.add_parser("generate", help="text -> image", formatter_class=_DefaultsFormatter)
    _add_model_source(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several; CLIP reads 77 tokens)")
    g.add_argument("--prompt-file", help=f"a UTF-8 text file with one prompt per line (at most {MAX_IMAGES} prompts)")
    g.add_argument("--steps", **STEPS, default=None,
                   help="sampling steps (default: the model's recommendation, else 20; with --package: the package's)")
    g.add_argument("--cfg", **CFG, default=None,
                   help="classifier-free guidance scale, 1 = off (default: the model's recommendation, else 2.0; "
                        "with --package: the package's)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of the first batch (batch at prompt i: seed + i)")
    g.add_argument("--sampler", choices=("euler", "heun"), default=None,
                   help="ODE sampler (default: the model's recommendation, else euler)")
    g.add_argument("--grid", choices=("reference", "consistent"), default=None,
                   help="time grid (default: the model's recommendation, else reference, which reproduces the "
                        "published checkpoints' outputs)")
    g.add_argument("--batch-size", **BATCH, default=None,
                   help="prompts per forward batch (default: 16; with --package: the package's batch)")
    g.add_argument("--package", metavar="PKG", help="an exported AOTInductor package (`flowtok-fast export`): "
                                                   "no compilation at start-up; replaces the model options")
    _add_dtype(g)
    g.add_argument("--out", default="outputs/grid.png", help="the image grid (.png, .jpg, .webp, ...)")
    g.add_argument("--save-individual", action="store_true", help="also save each image as OUT_000.png, ...")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="official checkpoint files -> a flowtok-fast directory")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--tokenizer", required=True)
    c.add_argument("--clip", required=True)
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=cmd_convert)

    cp = sub.add_parser("caption", help="image -> text (the reverse flow)", formatter_class=_DefaultsFormatter,
                        description="Exit code 1 when some images could not be read (each is reported on stderr "
                                    "and the others are captioned), 2 when none could.")
    cp.add_argument("images", nargs="+", help="image files")
    cp.add_argument("--model-dir", help="an image-to-text model directory: `flowtok-fast export-model` of a "
                                        "direction=i2t training run (or the shapes example's i2t/model)")
    cp.add_argument("--random-weights", action="store_true", help="untrained weights (gibberish captions)")
    cp.add_argument("--config", default="tiny", help="model size for --random-weights")
    cp.add_argument("--steps", **STEPS, default=None, help="sampling steps (default: the model's recommendation, else 20)")
    cp.add_argument("--cfg", **CFG, default=None, help="guidance scale, 1 = off (default: the model's recommendation, else 1)")
    cp.add_argument("--batch-size", **BATCH, default=32, help="images per batch")
    cp.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    cp.add_argument("--fused-kernels", action="store_true", help="use the Triton kernels (CUDA)")
    _add_dtype(cp)
    _add_mode(cp)
    cp.add_argument("--json", action="store_true", help="print JSON instead of tab-separated lines")
    _add_threads(cp)
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
    _add_threads(tr)
    tr.set_defaults(func=cmd_train)

    for verb, text in PASSTHROUGH_HELP.items():  # listed for --help only: main() hands them to their module
        sub.add_parser(verb, help=text)
    ex = sub.add_parser("example", help="run an example end to end: `example shapes --help`")
    ex.add_argument("name", choices=("shapes",),
                    help="shapes: captioned synthetic shapes, tokenizer + both flow directions, on a CPU")
    return parser


def run_shapes_example(argv: list[str]) -> int:
    """examples/shapes lives in the source tree, not in the installed package: find it beside an
    editable install (or the current directory) and say so clearly when it is absent."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "examples" / "shapes" / "run.py").is_file():
            sys.path.insert(0, str(root))
            from examples.shapes.run import main as shapes_main

            return shapes_main(argv)
    raise UserError("examples/shapes/ ships with the source tree; install with `pip install -e .` from a clone, "
                    "or run it from the repository root")


def take_threads(verb: str, argv: list[str]) -> tuple[int | None, list[str]]:
    p = OneLineParser(prog=f"flowtok-fast {verb}", add_help=False, allow_abbrev=False)
    p.add_argument("--threads", type=_count, default=None)
    args, rest = p.parse_known_args(argv)
    return args.threads, rest


def main(argv: list[str] | None = None) -> None:
    debug, argv = take_debug_flag(sys.argv[1:] if argv is None else list(argv))
    verb = argv[0] if argv else ""
    if verb in PASSTHROUGH:
        rest = argv[1:]
        if verb in THREADS_FOR_MODULE:
            threads, rest = take_threads(verb, rest)
            apply_threads(threads)
        sys.exit(run(verb, lambda: importlib.import_module(PASSTHROUGH[verb]).main(rest), debug))
    if argv[:2] == ["example", "shapes"]:
        sys.exit(run("example shapes", lambda: run_shapes_example(argv[2:]), debug))
    args = build_parser().parse_args(argv)
    code = run(args.command, lambda: args.func(args), debug)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
