"""The captioned-shapes example, end to end on a CPU:

  data -> tokenizer training -> pretokenise -> text-to-image generator -> samples -> evaluation
                                             -> text autoencoder -> image-to-text generator -> captions -> metrics

    python -m examples.shapes.run                          # configs/default.yaml, outputs/shapes
    python examples/shapes/run.py --config examples/shapes/configs/smoke.yaml --out /tmp/shapes
    python -m examples.shapes.run --directions t2i tokenizer.steps=500 t2i.lr=2e-3

Writes under --out: shards/ (webdataset tars), tokenizer/ (checkpoints + export), latents.pt,
t2i/ (trainer output + model/), i2t/ (text autoencoder, trainer output, model/), samples.png
(the t2i grid, prompts under the images), results.json (every metric, stage timings, load).
See README.md beside this file.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import resource
import sys
import textwrap
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import yaml

from examples.shapes import data as D
from examples.shapes import evaluate as E

log = logging.getLogger("shapes")
HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "default.yaml"


# ---------------------------------------------------------------- config


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """YAML, then `section.key=value` overrides (values parsed as YAML)."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}': expected section.key=value")
        node = cfg
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


# ---------------------------------------------------------------- bookkeeping


class Clock:
    """Wall time, process CPU time and the 1-minute load average per stage."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    @contextlib.contextmanager
    def stage(self, name: str):
        log.info(f"== {name}")
        w, c, l0 = time.perf_counter(), self._cpu(), os.getloadavg()[0]
        yield
        wall, cpu = time.perf_counter() - w, self._cpu() - c
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                             "load1_start": round(l0, 2), "load1_end": round(os.getloadavg()[0], 2)}
        log.info(f"== {name}: {wall:.1f} s wall, {cpu:.1f} s CPU")

    def total(self, names) -> float:
        return round(sum(self.stages[n]["wall_s"] for n in names if n in self.stages), 1)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    if isinstance(d, float):
        return round(d, 4)
    return d


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
    log.info(f"evaluator on ground-truth images: {json.dumps(_rounded(gt))}")
    return splits, sets


def build_clip(cfg: dict):
    """The frozen, randomly initialised, CLIP-architecture text tower (the tiny config)."""
    from flowtok_fast.configs import TINY
    from flowtok_fast.models.text import ClipTextEncoder

    torch.manual_seed(cfg["seed"] + 17)
    return ClipTextEncoder(TINY.clip).eval().requires_grad_(False)


def train_tokenizer(cfg: dict, out: Path, sets, clip, results: dict):
    from flowtok_fast.models.latent_norm import fit_latent_norm
    from flowtok_fast.train.tokenizer_trainer import TokenizerTrainer, export_tokenizer, load_tokenizer_config

    tc = dict(cfg["tokenizer"])
    tcfg = load_tokenizer_config(None, [], **{**tc, "model": "tiny", "resolution": cfg["resolution"],
                                              "output_dir": str(out / "tokenizer"), "seed": cfg["seed"]})
    train_ds = D.ImageTextDataset(sets["train"])
    trainer = TokenizerTrainer(tcfg, device="cpu", dataset=train_ds, clip=clip)
    history = trainer.train()
    _stop_if_interrupted(trainer)
    tok = trainer.ema_tokenizer().eval()
    # the flow space: each latent element standardised over the training images' posterior means
    # (flowtok_fast/models/latent_norm.py); the export carries it to every later stage
    moments = pretokenize(tok, train_ds)  # what the generators train on (saved by the pretokenize stage)
    tok.latent_norm.set(*fit_latent_norm(moments))
    export = export_tokenizer(tok, out / "tokenizer" / "export", {"step": trainer.step, "ema": True, "latent_norm": "fitted"})
    first, last = history[0] if history else {}, history[-1] if history else {}
    results["tokenizer"] = {"steps": trainer.step, "export": str(export),
                            "loss_first": first.get("loss"), "loss_last": last.get("loss"),
                            "l2_last": last.get("l2"), "config": tcfg.to_dict()}
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
    log.info(f"tokenizer reconstructions: {json.dumps(_rounded(out))}")


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


def _train_config(section: dict, out_dir: Path, seed: int, direction: str, tokenizer_weights: Path):
    from flowtok_fast.train import load_config as load_train_config

    values = {"resume": "none", **section, "model": "tiny", "direction": direction, "data_kind": "moments",
              "output_dir": str(out_dir), "seed": seed, "tokenizer_weights": str(tokenizer_weights)}
    # through the trainer's own key=value parsing: types coerced ('1e-4' is a string to YAML), unknown keys refused
    return load_train_config(None, [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in values.items()])


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
def sample_and_evaluate(cfg: dict, out: Path, splits, gen, tok, clip, results: dict):
    from flowtok_fast.models.text import tokenize
    from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions

    sc = cfg["sample"]
    pipe = FlowTokPipeline(shapes_config(tok, gen), clip, gen, tok, device="cpu")
    pipe.save_pretrained(str(out / "t2i" / "model"))
    rng = np.random.default_rng(cfg["seed"] + 99)
    evals = {}
    grid_images, grid_caps = [], []
    def generate(prompts, cfg_scale):
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
        log.info(f"t2i {name}: {json.dumps(_rounded({k: v for k, v in rates.items()}))}")
    captioned_grid(grid_images, grid_caps, cols=8, path=out / "samples.png")
    results["t2i"]["sampling"] = {"steps": sc["steps"], "cfg_scale": sc["cfg_scale"], "method": "euler", "grid": "reference"}
    results["t2i"]["eval"] = evals
    results["t2i"]["samples_png"] = str(out / "samples.png")


# ---------------------------------------------------------------- image-to-text


def grammar_vocab(captions: list[str]) -> torch.Tensor:
    """Every CLIP token id the captions use, with start / end of text and padding."""
    from flowtok_fast.models.text import EOT_ID, PAD_ID, SOT_ID, tokenize

    ids = tokenize(captions)
    return torch.unique(torch.cat([ids.flatten(), torch.tensor([SOT_ID, EOT_ID, PAD_ID])]))


def train_text_autoencoder(cfg: dict, out: Path, train_captions: list[str], clip, results: dict):
    """The text side, trained first and then frozen: the text VAE (CLIP features -> Z_T) and the
    TextDecoder (Z_T -> ids) as one autoencoder, cross-entropy + a small KL. The i2t flow ends at
    its Z_T (and its decoder reads them); the t2i flow starts there when
    text_autoencoder.freeze_for_t2i is set (else t2i trains its own text VAE jointly, as the paper).

    The decoder's softmax runs over the grammar's tokens only (the rows of its 49408-way head for
    the ids the captions use; the other rows get bias -1e4 afterwards, so decode_ids can only pick
    grammar tokens): the full softmax over 4.9k positions x 49408 ids would dominate the CPU time.
    """
    from flowtok_fast.configs import TINY
    from flowtok_fast.models.text import TextDecoder, TextVAE, tokenize
    from flowtok_fast.objective import kl_loss

    ac = cfg["text_autoencoder"]
    torch.manual_seed(cfg["seed"] + 3)
    vae, dec = TextVAE(TINY.text_vae), TextDecoder(TINY.text_vae, TINY.clip.vocab_size)
    vocab = grammar_vocab(train_captions)
    remap = torch.full((TINY.clip.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    caps = sorted(set(train_captions))
    ids = tokenize(caps)
    with torch.no_grad():
        feats = clip(ids)
    targets = remap[ids]
    params = list(vae.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=ac["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg["seed"] + 4)
    vae.train(), dec.train()
    history = []
    for step in range(ac["steps"]):
        idx = torch.randint(len(caps), (ac["batch"],), generator=g)
        mu, logvar = vae(feats[idx])
        z = TextVAE.sample(mu, logvar)
        x = dec.embed(z) + dec.positional_embedding
        for layer in dec.layers:
            x = layer(x)
        logits = x @ dec.head.weight[vocab].t() + dec.head.bias[vocab]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())
        kl = kl_loss(mu, logvar, "per_sample") / mu[0].numel()
        loss = ce + ac["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((ce.detach().item(), kl.detach().item()))
        if (step + 1) % max(1, ac["steps"] // 5) == 0:
            log.info(f"text autoencoder step {step + 1}/{ac['steps']}: ce {history[-1][0]:.4f} kl/elem {history[-1][1]:.3f}")
    with torch.no_grad():
        dec.head.bias[remap < 0] = -1e4
    vae.eval(), dec.eval()
    with torch.no_grad():
        mu, logvar = vae(feats)
        exact_mean = float((dec.decode_ids(mu) == ids).all(1).float().mean())
        exact_sample = float((dec.decode_ids(TextVAE.sample(mu, logvar, torch.Generator().manual_seed(0))) == ids).all(1).float().mean())
    results["text_autoencoder"] = {"steps": ac["steps"], "captions": len(caps), "vocab": len(vocab),
                                   "ce_last": history[-1][0] if history else None,
                                   "round_trip_exact_from_mean": exact_mean, "round_trip_exact_from_sample": exact_sample,
                                   "z_std": float(mu.std()), "sigma_mean": float((0.5 * logvar).exp().mean())}
    log.info(f"text autoencoder: {json.dumps(_rounded(results['text_autoencoder']))}")
    return vae, dec


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


def train_flow(direction: str, cfg: dict, out: Path, moments, ids, clip, vae, tokenizer_weights: Path, results: dict):
    """The generator for one direction, trained by the package's Trainer on the pretokenised
    moments (flow space from the exported tokenizer's latent norm)."""
    from flowtok_fast.train import Trainer

    section = dict(cfg[direction])
    if direction == "i2t":
        # the decoder was trained (on the grammar's vocabulary) with the text VAE before, and both
        # stay frozen here; the trainer's joint 49408-way decoder is far too slow on CPU
        section["text_decoder"] = False
    tcfg = _train_config(section, out / direction, cfg["seed"], direction, tokenizer_weights)
    trainer = Trainer(tcfg, device="cpu", dataset=D.LatentTextDataset(moments, ids))
    trainer.frozen.clip.load_state_dict(clip.state_dict())  # the example's text tower
    if direction == "i2t" or cfg["text_autoencoder"].get("freeze_for_t2i", False):
        use_pretrained_text_vae(trainer, vae)
    history = trainer.train()
    _stop_if_interrupted(trainer)
    results[direction] = {"steps": trainer.step, "loss_first": history[0]["loss"] if history else None,
                          "loss_last": history[-1]["loss"] if history else None,
                          "flow_last": history[-1]["flow"] if history else None,
                          "samples_per_s_last": history[-1].get("samples_per_s") if history else None,
                          "config": tcfg.to_dict()}
    return _ema_generator(trainer)


@torch.no_grad()
def caption_and_evaluate(cfg: dict, out: Path, sets, gen, tok, text_decoder, results: dict):
    from flowtok_fast.captioning import FlowTokCaptioner

    cc = cfg["caption"]
    cap = FlowTokCaptioner(shapes_config(tok, gen), tok, gen, text_decoder, device="cpu")
    cap.save_pretrained(str(out / "i2t" / "model"))
    evals = {}
    for name in ("new", "held_out"):
        scenes = sets[name][: cc["images"]]
        refs = [s.caption for s, _ in scenes]
        px = to_tensor([im for _, im in scenes])
        def caption(cfg_scale):
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
        log.info(f"i2t {name}: {json.dumps(_rounded({k: v for k, v in entry.items() if k != 'examples'}))}")
    results["i2t"]["captioning"] = {"steps": cc["steps"], "cfg_scale": cc["cfg_scale"]}
    results["i2t"]["eval"] = evals


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowtok-fast example shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--out", default="outputs/shapes", help="output directory")
    parser.add_argument("--directions", nargs="+", choices=("t2i", "i2t"), default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the config's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. t2i.steps=100 tokenizer.lr=2e-3")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    directions = args.directions or cfg.get("directions", ["t2i", "i2t"])
    threads = args.threads or cfg.get("threads", 1)
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from flowtok_fast.models.text import tokenize

    clock = Clock()
    results: dict = {"config": cfg, "directions": directions, "out": str(out),
                     "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
                                 "python": platform.python_version(), "load1_at_start": round(os.getloadavg()[0], 2)}}
    with clock.stage("data"):
        splits, sets = make_data(cfg, out, results)
        clip = build_clip(cfg)
    with clock.stage("tokenizer"):
        tok, train_ds, moments = train_tokenizer(cfg, out, sets, clip, results)
        check_tokenizer(tok, clip, sets, results)
    with clock.stage("pretokenize"):  # the moments come from the tokenizer stage's norm fit
        torch.save({"moments": moments, "captions": train_ds.captions}, out / ".latents.pt.tmp")
        os.replace(out / ".latents.pt.tmp", out / "latents.pt")
    tokenizer_weights = out / "tokenizer" / "export" / "model.safetensors"  # encoder, decoder and latent norm
    with clock.stage("text_autoencoder"):
        vae, text_decoder = train_text_autoencoder(cfg, out, train_ds.captions, clip, results)
    if "t2i" in directions:
        with clock.stage("t2i_train"):
            gen = train_flow("t2i", cfg, out, moments, train_ds.ids, clip, vae, tokenizer_weights, results)
        with clock.stage("t2i_sample_eval"):
            sample_and_evaluate(cfg, out, splits, gen, tok, clip, results)
    if "i2t" in directions:
        # one caption per layout as the target ("above" / "to the left of"): the flow cannot know
        # which of two mirrored captions an image was drawn for
        canonical = [D.canonical_caption(c) for c in train_ds.captions]
        with clock.stage("i2t_train"):
            gen_i2t = train_flow("i2t", cfg, out, moments, tokenize(canonical), clip, vae, tokenizer_weights, results)
        with clock.stage("i2t_caption_eval"):
            caption_and_evaluate(cfg, out, sets, gen_i2t, tok, text_decoder, results)

    shared = ["data", "tokenizer", "pretokenize", "text_autoencoder"]
    results["timings"] = {
        "stages": clock.stages,
        "t2i_end_to_end_s": clock.total(shared + ["t2i_train", "t2i_sample_eval"]) if "t2i" in directions else None,
        "i2t_end_to_end_s": clock.total(shared + ["i2t_train", "i2t_caption_eval"]) if "i2t" in directions else None,
        "total_s": round(time.perf_counter() - clock.t0, 1),
        "note": "each direction's end-to-end time counts the shared stages (data, tokenizer, pretokenize, text autoencoder) once",
    }
    results["machine"]["load1_at_end"] = round(os.getloadavg()[0], 2)
    results["machine"]["cpu_s_total"] = round(Clock._cpu(), 1)
    _atomic_json(out / "results.json", _rounded(results))
    log.info(f"results: {out / 'results.json'}")
    summary = {"t2i": {k: {m: v.get(m) for m in ("colour_accuracy", "shape_accuracy", "image_accuracy")}
                       for k, v in results.get("t2i", {}).get("eval", {}).items()},
               "i2t": {k: {m: v.get(m) for m in ("colour_accuracy", "shape_accuracy", "exact_match", "BLEU-4")}
                       for k, v in results.get("i2t", {}).get("eval", {}).items()},
               "timings": {k: results["timings"][k] for k in ("t2i_end_to_end_s", "i2t_end_to_end_s", "total_s")}}
    print(json.dumps(_rounded(summary), indent=2))
    table = results_table(results)
    tmp = out / ".results.md.tmp"
    tmp.write_text(table)
    os.replace(tmp, out / "results.md")  # never a half-written table
    print(table)
    return 0


def results_table(results: dict) -> str:
    """The headline numbers as a markdown table (the README's Results section is pasted from it)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    rows = ["| direction | split | colour | shape | both right | everything right | other |", "|---|---|---|---|---|---|---|"]
    for name, ev in results.get("t2i", {}).get("eval", {}).items():
        other = "; ".join(f"CFG {c}: colour {pct(r['colour_accuracy'])}, shape {pct(r['shape_accuracy'])}"
                          for c, r in ev.get("other_cfg_scales", {}).items())
        rows.append(f"| t2i (CFG {results['t2i']['sampling']['cfg_scale']}) | {name} | {pct(ev.get('colour_accuracy'))} | "
                    f"{pct(ev.get('shape_accuracy'))} | {pct(ev.get('object_accuracy'))} | {pct(ev.get('image_accuracy'))} | {other} |")
    for name, ev in results.get("i2t", {}).get("eval", {}).items():
        other = "; ".join(f"CFG {c}: colour {pct(r['colour_accuracy'])}, shape {pct(r['shape_accuracy'])}"
                          for c, r in ev.get("other_cfg_scales", {}).items())
        bleu = f"BLEU-4 {ev['BLEU-4']:.3f}, exact match {pct(ev.get('exact_match'))}" if "BLEU-4" in ev else ""
        rows.append(f"| i2t (CFG {results['i2t']['captioning']['cfg_scale']}) | {name} | {pct(ev.get('colour_accuracy'))} | "
                    f"{pct(ev.get('shape_accuracy'))} | {pct(ev.get('object_accuracy'))} | {pct(ev.get('layout_accuracy'))} | "
                    f"{'; '.join(x for x in (bleu, other) if x)} |")
    t = results.get("timings", {})
    rows.append("")
    rows.append(f"End to end (wall): t2i {t.get('t2i_end_to_end_s')} s, i2t {t.get('i2t_end_to_end_s')} s, "
                f"whole run {t.get('total_s')} s; stages: "
                + ", ".join(f"{k} {v['wall_s']} s" for k, v in t.get("stages", {}).items()))
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
