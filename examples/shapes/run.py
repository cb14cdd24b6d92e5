"""The captioned-shapes example, end to end on a CPU:

  data -> tokenizer training -> pretokenise -> text-to-image generator -> samples -> evaluation
                                             -> text autoencoder -> image-to-text generator -> captions -> metrics

    python -m examples.shapes.run                          # configs/default.yaml, outputs/shapes
    python examples/shapes/run.py --config examples/shapes/configs/smoke.yaml --out /tmp/shapes
    python -m examples.shapes.run --directions t2i tokenizer.steps=500 t2i.lr=2e-3

Writes under --out: shards/ (webdataset tars), tokenizer/ (checkpoints + export), latents.pt,
t2i/ (trainer output + model/), i2t/ (text autoencoder, trainer output, model/), samples.png
(the t2i grid, prompts under the images), results.json (every metric, stage timings and
samples/s, commit, threads, load, digests), results.md (the README's table). Every stage's config
is checked before the first stage runs. See README.md beside this file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from examples.shapes import data as D
from examples.shapes import evaluate as E
from examples.shapes import record as R
from examples.shapes.config import load_config, tokenizer_train_config, train_config
from examples.shapes.text_autoencoder import train_text_autoencoder
from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.errors import UserError
from flowtok_fast.validate import COUNT, IMAGES

log = logging.getLogger("shapes")
HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "default.yaml"


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def captioned_grid(images: list[np.ndarray], captions: list[str], cols: int = 8, scale: int = 4, path: Path | None = None):
    """Images upscaled (nearest) with their prompt wrapped underneath; saved as PNG atomically."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = images[0].shape[:2]
    cw, ch = w * scale, h * scale
    chars = max(8, cw // 6)
    text_h = 11 * 4
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cw, rows * (ch + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cw, (i // cols) * (ch + text_h)
        grid.paste(Image.fromarray(im).resize((cw, ch), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(cap, chars)[:4]):
            draw.text((x + 2, y + ch + 1 + 11 * j), line, fill=(0, 0, 0), font=font)
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp.png")
        grid.save(tmp)
        os.replace(tmp, path)
    return grid


# ---------------------------------------------------------------- stages


def make_data(cfg: dict, out: Path, results: dict):
    dc = cfg["data"]
    res, seed = cfg["resolution"], cfg["seed"]
    splits = D.make_splits(tuple(tuple(c) for c in dc["held_out_combos"]), dc["new_fraction"], seed)
    bgs = tuple(dc["backgrounds"])
    jitter = float(dc.get("jitter", 1.0))
    specs = {
        "train": D.DatasetSpec("train", splits.train, dc["train_size"], seed * 1000 + 1, res, bgs, jitter),
        "new": D.DatasetSpec("new", splits.new, dc["eval_size"], seed * 1000 + 2, res, bgs, jitter),
        "held_out": D.DatasetSpec("held_out", splits.held_out, dc["eval_size"], seed * 1000 + 3, res, bgs, jitter),
    }
    written = {}
    for name, spec in specs.items():
        written[name] = D.write_shards(D.generate(spec), out / "shards", name, dc["per_shard"])
    # the rest of the chain reads the shards back, as a real pipeline would
    sets = {name: D.read_shards(w["shards"]) for name, w in written.items()}
    results["data"] = {"splits": splits.to_dict(), "resolution": res, "backgrounds": list(bgs), "jitter": jitter,
                       "shard_writer": written["train"]["writer"],
                       "shards": {k: {"count": w["count"], "files": len(w["shards"])} for k, w in written.items()}}
    # the evaluator on ground truth first: it should be (near) 100%
    gt = {}
    for name in ("new", "held_out"):
        rates, _ = E.evaluate_images([im for _, im in sets[name]], [s.caption for s, _ in sets[name]])
        gt[name] = rates
    results["evaluator_on_ground_truth"] = gt
    log.info(f"evaluator on ground-truth images: {json.dumps(R.rounded(gt))}")
    return splits, sets


def build_clip(cfg: dict):
    """The frozen, randomly initialised, CLIP-architecture text tower (the tiny config)."""
    from flowtok_fast.configs import TINY
    from flowtok_fast.models.text import ClipTextEncoder

    torch.manual_seed(cfg["seed"] + 17)
    return ClipTextEncoder(TINY.clip).eval().requires_grad_(False)


def train_tokenizer(cfg: dict, out: Path, sets, clip, results: dict, speed: R.Throughput):
    from flowtok_fast.models.latent_norm import fit_latent_norm
    from flowtok_fast.train.tokenizer_trainer import TokenizerTrainer, export_tokenizer

    tcfg = tokenizer_train_config(cfg["tokenizer"], cfg, out / "tokenizer")
    train_ds = D.ImageTextDataset(sets["train"])
    trainer = TokenizerTrainer(tcfg, device="cpu", dataset=train_ds, clip=clip)
    with speed.measure("tokenizer_train", tcfg.steps * tcfg.global_batch):
        history = trainer.train()
    _stop_if_interrupted(trainer)
    tok = trainer.ema_tokenizer().eval()
    # the flow space: each latent element standardised over the training images' posterior means
    # (flowtok_fast/models/latent_norm.py); the export carries it to every later stage
    with speed.measure("pretokenize", len(train_ds)):
        moments = pretokenize(tok, train_ds)  # what the generators train on (saved by the pretokenize stage)
    tok.latent_norm.set(*fit_latent_norm(moments))
    export = export_tokenizer(tok, out / "tokenizer" / "export", {"step": trainer.step, "ema": True, "latent_norm": "fitted"})
    first, last = history[0] if history else {}, history[-1] if history else {}
    results["tokenizer"] = {"steps": trainer.step, "export": str(export),
                            "loss_first": first.get("loss"), "loss_last": last.get("loss"),
                            "l2_last": last.get("l2"), "config": tcfg.to_dict(),
                            "latents": E.latent_statistics(moments, train_ds.captions, tok.latent_norm)}
    log.info(f"tokenizer latents: {json.dumps(R.rounded(results['tokenizer']['latents']))}")
    return tok, train_ds, moments


@torch.no_grad()
def check_tokenizer(tok, clip, sets, results: dict, batch: int = 100):
    """Reconstructions of held-out images: MSE and the evaluator, decoded with the caption's text
    features, with the empty caption's, and (control) with the caption but another image's latents."""
    from flowtok_fast.models.text import tokenize

    scenes = sets["new"] + sets["held_out"]
    caps = [s.caption for s, _ in scenes]
    px = to_tensor([im for _, im in scenes])
    z = torch.cat([tok.encode(px[i:i + batch], sample=False) for i in range(0, len(px), batch)])
    feats = clip(tokenize(caps))
    null = clip(tokenize([""])).expand(len(caps), -1, -1)
    perm = torch.roll(torch.arange(len(caps)), 1)
    out = {"latent_std": float(z.std()), "latent_std_across_images": float(z.std(0).mean())}
    for name, (zz, ff) in {"with_text": (z, feats), "null_text": (z, null), "control_other_latents": (z[perm], feats)}.items():
        rec = torch.cat([tok.decode(zz[i:i + batch], ff[i:i + batch]) for i in range(0, len(zz), batch)])
        rates, _ = E.evaluate_images(to_uint8(rec), caps)
        out[name] = {"mse": float((rec - px).square().mean()), **rates}
    results["tokenizer"]["reconstruction"] = out
    log.info(f"tokenizer reconstructions: {json.dumps(R.rounded(out))}")


@torch.no_grad()
def pretokenize(tok, dataset, batch: int = 200) -> torch.Tensor:
    """Posterior moments [N, 32, 1, 77] of every training image (what the generator trainer reads)."""
    moments = []
    for i in range(0, len(dataset), batch):
        px = dataset.batch(list(range(i, min(i + batch, len(dataset)))))["pixels"]
        moments.append(tok.encoder(px, tok.latent_tokens).float())
    return torch.cat(moments)


def _stop_if_interrupted(trainer) -> None:
    """The trainers save and return early on SIGTERM; the chain must not go on with a half-trained model."""
    if trainer.step < trainer.cfg.steps:
        raise SystemExit(f"{type(trainer).__name__} stopped at step {trainer.step} of {trainer.cfg.steps} "
                         f"(SIGTERM?): its checkpoint is in {trainer.output_dir}; the example stops here")


def _ema_generator(trainer):
    from flowtok_fast.models.generator import FlowTokGenerator

    model_cfg = trainer.cfg.model_config()
    gen = FlowTokGenerator(model_cfg.generator, model_cfg.text_vae)
    gen.load_state_dict({k: v.reshape(gen.state_dict()[k].shape) for k, v in trainer.objective.generator.state_dict().items()})
    trainer.ema.copy_to(gen)
    return gen.eval()


def shapes_config(tok, gen):
    from flowtok_fast.configs import TINY, FlowTokConfig

    return FlowTokConfig(generator=gen.cfg, text_vae=TINY.text_vae, clip=TINY.clip, tokenizer=tok.cfg, name="shapes")


@torch.no_grad()
def sample_and_evaluate(cfg: dict, out: Path, splits, gen, tok, clip, results: dict) -> int:
    """Samples for new, held-out and seen prompts, scored by the evaluator; returns the number of images generated."""
    from flowtok_fast.models.text import tokenize
    from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions

    sc = cfg["sample"]
    pipe = FlowTokPipeline(shapes_config(tok, gen), clip, gen, tok, device="cpu")
    pipe.save_pretrained(str(out / "t2i" / "model"))
    rng = np.random.default_rng(cfg["seed"] + 99)
    evals = {}
    grid_images, grid_caps = [], []
    generated = [0]

    def generate(prompts, cfg_scale):
        generated[0] += len(prompts)
        opts = SamplingOptions(steps=sc["steps"], cfg_scale=cfg_scale, seed=cfg["seed"])
        feats = pipe.encode_text(prompts)
        lat = pipe.flow(pipe.text_latents(feats, pipe.generator_rng(opts.seed)), opts)
        return lat, feats, pipe.decode(lat, feats)

    for name in ("new", "held_out", "train"):  # train: prompts seen in training (fit vs generalisation)
        pool = list(getattr(splits, name))
        prompts = [pool[i] for i in rng.choice(len(pool), size=min(sc["prompts"], len(pool)), replace=False)]
        lat, feats, images = generate(prompts, sc["cfg_scale"])
        rates, scores = E.evaluate_images(to_uint8(images), prompts)
        if name == "train":
            evals[name] = rates
            continue
        # what the latents alone carry (decoded without the prompt), and a control: the prompt's
        # text with latents generated for OTHER prompts (how much the decoder's guidance draws alone)
        null = clip(tokenize([""])).expand(len(prompts), -1, -1)
        no_text, _ = E.evaluate_images(to_uint8(pipe.decode(lat, null)), prompts)
        perm = torch.roll(torch.arange(len(prompts)), 1)
        other, _ = E.evaluate_images(to_uint8(pipe.decode(lat[perm], feats)), prompts)
        other_scales = {str(c): E.evaluate_images(to_uint8(generate(prompts, c)[2]), prompts)[0]
                        for c in sc.get("compare_cfg_scales", [])}
        evals[name] = {**rates, "decoded_without_text": no_text, "control_other_prompts_latents": other,
                       "other_cfg_scales": other_scales,
                       "examples": [{"prompt": s.caption, "colour_correct": s.colour_correct, "shape_correct": s.shape_correct,
                                     "objects": s.objects} for s in scores[:16]]}
        grid_images += to_uint8(images[:16])
        grid_caps += prompts[:16]
        log.info(f"t2i {name}: {json.dumps(R.rounded({k: v for k, v in rates.items()}))}")
    captioned_grid(grid_images, grid_caps, cols=8, path=out / "samples.png")
    results["t2i"]["sampling"] = {"steps": sc["steps"], "cfg_scale": sc["cfg_scale"], "method": "euler", "grid": "reference"}
    results["t2i"]["eval"] = evals
    results["t2i"]["samples_png"] = str(out / "samples.png")
    return generated[0]


# ---------------------------------------------------------------- image-to-text


def _freeze_eval(module: torch.nn.Module) -> None:
    module.requires_grad_(False).eval()
    module.train = lambda mode=True: torch.nn.Module.train(module, False)  # stays in eval (no dropout)


def use_pretrained_text_vae(trainer, vae) -> None:
    """Load the text autoencoder's VAE into the generator and freeze it: it defines Z_T (the text
    end of the flow); only the flow (and, in t2i, the alignment projector) trains."""
    gen = trainer.objective.generator
    gen.context_encoder.load_state_dict(vae.state_dict())
    _freeze_eval(gen.context_encoder)
    ema = trainer.ema.state_dict()  # keep the EMA copy of the frozen VAE equal to it
    for name, p in gen.named_parameters():
        if name.startswith("context_encoder."):
            ema[name].copy_(p.detach())


def train_flow(direction: str, cfg: dict, out: Path, moments, ids, clip, vae, tokenizer_weights: Path, results: dict,
               speed: R.Throughput):
    """The generator for one direction, trained by the package's Trainer on the pretokenised
    moments (flow space from the exported tokenizer's latent norm)."""
    from flowtok_fast.train import Trainer

    tcfg = train_config(cfg[direction], out / direction, cfg["seed"], direction, tokenizer_weights)
    trainer = Trainer(tcfg, device="cpu", dataset=D.LatentTextDataset(moments, ids))
    trainer.frozen.clip.load_state_dict(clip.state_dict())  # the example's text tower
    if direction == "i2t" or cfg["text_autoencoder"].get("freeze_for_t2i", False):
        use_pretrained_text_vae(trainer, vae)
    with speed.measure(f"{direction}_train", tcfg.steps * tcfg.global_batch):
        history = trainer.train()
    _stop_if_interrupted(trainer)
    results[direction] = {"steps": trainer.step, "loss_first": history[0]["loss"] if history else None,
                          "loss_last": history[-1]["loss"] if history else None,
                          "flow_last": history[-1]["flow"] if history else None,
                          "samples_per_s_last": history[-1].get("samples_per_s") if history else None,
                          "config": tcfg.to_dict()}
    return _ema_generator(trainer)


@torch.no_grad()
def caption_and_evaluate(cfg: dict, out: Path, sets, gen, tok, text_decoder, results: dict) -> int:
    """Captions of new and held-out images, scored against theirs; returns the number of captions written."""
    from flowtok_fast.captioning import FlowTokCaptioner

    cc = cfg["caption"]
    cap = FlowTokCaptioner(shapes_config(tok, gen), tok, gen, text_decoder, device="cpu")
    cap.save_pretrained(str(out / "i2t" / "model"))
    evals = {}
    captioned = 0
    for name in ("new", "held_out"):
        scenes = sets[name][: cc["images"]]
        refs = [s.caption for s, _ in scenes]
        px = to_tensor([im for _, im in scenes])
        def caption(cfg_scale):
            nonlocal captioned
            captioned += len(px)
            return [c for i in range(0, len(px), 100) for c in cap(px[i:i + 100], steps=cc["steps"], cfg_scale=cfg_scale)]

        captions = caption(cc["cfg_scale"])
        rates, scores = E.evaluate_captions(captions, refs)
        entry = dict(rates)
        entry["exact_match"] = sum(c == r or c in D.equivalent_captions(r) for c, r in zip(captions, refs)) / max(len(refs), 1)
        entry["other_cfg_scales"] = {str(c): E.evaluate_captions(caption(c), refs)[0] for c in cc.get("compare_cfg_scales", [])}
        try:
            from flowtok_fast.metrics import caption_metrics

            m = caption_metrics({i: c for i, c in enumerate(captions)},
                                {i: D.equivalent_captions(r) for i, r in enumerate(refs)},
                                spice=False, meteor=bool(cc.get("meteor", False)))
            entry.update({k: v for k, v in m.items() if k != "notes"})
            if m["notes"]:
                entry["metric_notes"] = m["notes"]
        except (ImportError, RuntimeError) as err:  # no pycocoevalcap or no Java
            entry["metric_notes"] = [f"BLEU/METEOR skipped: {err}"]
        entry["examples"] = [{"reference": r, "caption": c} for r, c in list(zip(refs, captions))[:12]]
        evals[name] = entry
        log.info(f"i2t {name}: {json.dumps(R.rounded({k: v for k, v in entry.items() if k != 'examples'}))}")
    results["i2t"]["captioning"] = {"steps": cc["steps"], "cfg_scale": cc["cfg_scale"]}
    results["i2t"]["eval"] = evals
    return captioned


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="flowtok-fast example shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--out", default="outputs/shapes", help="output directory")
    parser.add_argument("--directions", nargs="+", choices=("t2i", "i2t"), default=None, help="default: the config's")
    parser.add_argument("--threads", **COUNT, default=None, help="torch CPU threads (default: the config's)")
    parser.add_argument("--images", **IMAGES, help="only draw this many ground-truth images (and captions.txt) "
                        "into --out to caption, e.g. with examples/shapes/models/i2t; no training")
    parser.add_argument("--split", default="new", help="with --images: new (default), held_out or train")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. t2i.steps=100 tokenizer.lr=2e-3")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, args.directions)  # every stage's keys and values, before any work
    if args.images is not None:
        from examples.shapes.draw import draw_images

        written = draw_images(cfg, args.images, args.split, Path(args.out))
        print(f"{len(written)} {args.split}-split images and captions.txt in {args.out}; caption them with: flowtok-fast "
              f"caption {Path(args.out) / '*.png'} --model-dir examples/shapes/models/i2t --steps 25")
        return 0
    directions = args.directions or cfg.get("directions", ["t2i", "i2t"])
    threads = args.threads or cfg.get("threads", 1)
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a directory (new or existing)")
    out.mkdir(parents=True, exist_ok=True)

    from flowtok_fast.models.text import tokenize

    clock, speed = R.Clock(), R.Throughput()
    results: dict = {"config": cfg, "directions": directions, "out": str(out), "provenance": R.provenance(argv),
                     "machine": R.machine(threads)}
    digests = {}
    with clock.stage("data"):
        splits, sets = make_data(cfg, out, results)
        clip = build_clip(cfg)
    with clock.stage("tokenizer"):
        tok, train_ds, moments = train_tokenizer(cfg, out, sets, clip, results, speed)
        check_tokenizer(tok, clip, sets, results)
    digests["tokenizer"], digests["latents"] = R.weights_digest(tok), R.tensor_digest(moments)
    with clock.stage("pretokenize"):  # the moments come from the tokenizer stage's norm fit
        torch.save({"moments": moments, "captions": train_ds.captions}, out / ".latents.pt.tmp")
        os.replace(out / ".latents.pt.tmp", out / "latents.pt")
    tokenizer_weights = out / "tokenizer" / "export" / "model.safetensors"  # encoder, decoder and latent norm
    with clock.stage("text_autoencoder"), speed.measure("text_autoencoder", cfg["text_autoencoder"]["steps"] * cfg["text_autoencoder"]["batch"]):
        vae, text_decoder = train_text_autoencoder(cfg, out, train_ds.captions, clip, results)
    digests["text_autoencoder"] = R.weights_digest(vae, text_decoder)
    if "t2i" in directions:
        with clock.stage("t2i_train"):
            gen = train_flow("t2i", cfg, out, moments, train_ds.ids, clip, vae, tokenizer_weights, results, speed)
        digests["t2i"] = R.weights_digest(gen)
        with clock.stage("t2i_sample_eval"), speed.measure("t2i_sample") as count:
            count[0] = sample_and_evaluate(cfg, out, splits, gen, tok, clip, results)
    if "i2t" in directions:
        # one caption per layout as the target ("above" / "to the left of"): the flow cannot know
        # which of two mirrored captions an image was drawn for
        canonical = [D.canonical_caption(c) for c in train_ds.captions]
        with clock.stage("i2t_train"):
            gen_i2t = train_flow("i2t", cfg, out, moments, tokenize(canonical), clip, vae, tokenizer_weights, results, speed)
        digests["i2t"] = R.weights_digest(gen_i2t)
        with clock.stage("i2t_caption_eval"), speed.measure("i2t_caption") as count:
            count[0] = caption_and_evaluate(cfg, out, sets, gen_i2t, tok, text_decoder, results)
    results["digests"] = {"results": R.results_digest(results), **digests}

    shared = ["data", "tokenizer", "pretokenize", "text_autoencoder"]
    results["timings"] = {
        "stages": clock.stages,
        "t2i_end_to_end_s": clock.total(shared + ["t2i_train", "t2i_sample_eval"]) if "t2i" in directions else None,
        "i2t_end_to_end_s": clock.total(shared + ["i2t_train", "i2t_caption_eval"]) if "i2t" in directions else None,
        "total_s": round(time.perf_counter() - clock.t0, 1),
        "note": "each direction's end-to-end time counts the shared stages (data, tokenizer, pretokenize, text autoencoder) once",
    }
    results["throughput"] = speed.rates
    results["machine"]["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["cpu_s_total"] = round(R.Clock.cpu(), 1)
    R.atomic_json(out / "results.json", R.rounded(results))
    log.info(f"results: {out / 'results.json'}")
    summary = {"t2i": {k: {m: v.get(m) for m in ("colour_accuracy", "shape_accuracy", "image_accuracy")}
                       for k, v in results.get("t2i", {}).get("eval", {}).items()},
               "i2t": {k: {m: v.get(m) for m in ("colour_accuracy", "shape_accuracy", "exact_match", "BLEU-4")}
                       for k, v in results.get("i2t", {}).get("eval", {}).items()},
               "timings": {k: results["timings"][k] for k in ("t2i_end_to_end_s", "i2t_end_to_end_s", "total_s")},
               "samples_per_s": {k: v["samples_per_s"] for k, v in speed.rates.items()},
               "digests": results["digests"]}
    print(json.dumps(R.rounded(summary), indent=2))
    table = R.results_table(results)
    tmp = out / ".results.md.tmp"
    tmp.write_text(table)
    os.replace(tmp, out / "results.md")  # never a half-written table
    print(table)
    return 0


def _cli() -> int:
    """`python -m examples.shapes.run`: bad input is one line and exit code 2, as the CLI verb does."""
    try:
        return main()
    except UserError as err:
        if os.environ.get("FLOWTOK_DEBUG"):
            raise
        print(f"flowtok-fast example shapes: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
