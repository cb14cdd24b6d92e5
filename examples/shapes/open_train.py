"""Train the open-caption task's text-to-image teacher (open_data.py) on a CPU, reusing the shipped
shapes models: their tokenizer (encoder in models/i2t, decoder in models/t2i, one latent norm) and
frozen random CLIP; only the generator (with its jointly trained text VAE) trains, with the example's
own stage (`run.train_flow`).

    python -m examples.shapes.open_train --out /work/runs/open_t2i                 # configs/open.yaml
    python -m examples.shapes.open_train --out DIR t2i.steps=2000 data.train_size=8000
    python -m examples.shapes.open_train --out DIR text_autoencoder.freeze_for_t2i=true text_autoencoder.kl_weight=1.0e-2

Writes under --out: tokenizer/export (the shipped tokenizer, for the trainer's latent norm), t2i/
(trainer output), model/ (fp32 model directory), train.json (timings, losses, commit, machine).
`python -m examples.shapes.open_ship DIR` measures and ships it; --ship DIR here only stores it small
(fp16 parameters + the grammar's vocabulary rows), unmeasured. text_autoencoder.freeze_for_t2i: the
flow starts from a text VAE trained first on the training captions, then frozen (text_autoencoder.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import yaml

from examples.shapes import data as D
from examples.shapes import open_data as O
from examples.shapes import record as R
from examples.shapes.evaluate import latent_statistics
from examples.shapes.run import pretokenize, shapes_config, train_flow
from examples.shapes.text_autoencoder import grammar_vocab, train_text_autoencoder
from flowtok_fast.cli_errors import OneLineParser

log = logging.getLogger("shapes")
HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"


def load_open_config(path: Path, overrides: list[str]) -> dict:
    from examples.shapes.config import train_config
    from flowtok_fast.errors import UserError

    cfg = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, leaf = key.partition(".")
        if not sep or not leaf or section not in ("data", "t2i", "text_autoencoder"):
            raise UserError(f"override '{item}': expected data.KEY=VALUE, t2i.KEY=VALUE or text_autoencoder.KEY=VALUE")
        cfg.setdefault(section, {})[leaf] = yaml.safe_load(value)
    train_config(cfg["t2i"], "unused", cfg["seed"], "t2i", "unused")  # the trainer's own checks, before any work
    return cfg


def shipped_parts(models: Path = MODELS):
    """(full tokenizer with encoder, decoder-only tokenizer, clip) of the shipped shapes models."""
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline.from_pretrained(str(models / "t2i"), device="cpu")
    cap = FlowTokCaptioner.from_pretrained(str(models / "i2t"), device="cpu")
    full, dec = cap.tokenizer, pipe.tokenizer
    for name in ("latent_norm.shift", "latent_norm.scale"):  # one flow space, or the decoder reads other latents
        if not torch.equal(full.state_dict()[name], dec.state_dict()[name]):
            raise RuntimeError(f"models/i2t and models/t2i have different {name}: not one tokenizer")
    return full, dec, pipe.clip


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m examples.shapes.open_train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "configs" / "open.yaml"))
    parser.add_argument("--out", required=True, help="run directory (outside the repository)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ship", default=None, help="also store the model small in this directory")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cfg = load_open_config(Path(args.config), args.overrides)
    threads = args.threads or cfg.get("threads", 1)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flowtok_fast.train.tokenizer_trainer import export_tokenizer

    clock, speed = R.Clock(), R.Throughput()
    result = {"config": cfg, "provenance": {**R.commit(), "command": " ".join(["python -m examples.shapes.open_train", *argv])},
              "machine": R.machine(threads)}
    full, dec, clip = shipped_parts()
    tok_weights = export_tokenizer(full, out / "tokenizer" / "export", {"source": "examples/shapes/models/i2t"}) / "model.safetensors"
    splits = O.make_open_splits(cfg["seed"])
    result["splits"] = splits.to_dict()
    with clock.stage("data"):
        samples = O.generate_open(splits.train, cfg["data"]["train_size"], cfg["seed"] * 1000 + 1, jitter=cfg["data"]["jitter"])
        ds = D.ImageTextDataset(samples)
    with clock.stage("pretokenize"), speed.measure("pretokenize", len(ds)):
        moments = pretokenize(full, ds)
    # how much the open captions explain of the latents (the base task's: 0.87): lower means more left to the noise
    result["latents"] = latent_statistics(moments, ds.captions, full.latent_norm)
    log.info(f"open latents: {json.dumps(R.rounded(result['latents']))}")
    # text_autoencoder.freeze_for_t2i: the flow starts from a text VAE trained first as an autoencoder of the
    # training captions (text_autoencoder.py), then frozen; otherwise the generator trains its own jointly
    ac = {"freeze_for_t2i": False, "steps": 300, "batch": 64, "lr": 2.0e-3, "kl_weight": 1.0e-4, **cfg.get("text_autoencoder", {})}
    ac["lr"], ac["kl_weight"] = float(ac["lr"]), float(ac["kl_weight"])  # YAML reads '1e-2' as a string
    vae = None
    if ac["freeze_for_t2i"]:
        with clock.stage("text_autoencoder"):
            vae, _ = train_text_autoencoder({**cfg, "text_autoencoder": ac}, out, list(splits.train), clip, result)
    with clock.stage("t2i_train"):
        gen = train_flow("t2i", {**cfg, "text_autoencoder": ac}, out, moments, ds.ids, clip, vae, tok_weights, result, speed)
    from flowtok_fast.pipeline import FlowTokPipeline

    pipe = FlowTokPipeline(shapes_config(dec, gen), clip, gen, dec, device="cpu")
    pipe.save_pretrained(str(out / "model"))
    if args.ship:
        pipe.save_pretrained(args.ship, "float16", grammar_vocab(list(D.all_captions())))
        result["shipped"] = {"dir": args.ship, "dtype": "float16",
                             "bytes": sum(f.stat().st_size for f in Path(args.ship).iterdir() if f.is_file())}
    result["timings"] = {"stages": clock.stages, "total_s": round(time.perf_counter() - clock.t0, 1)}
    result["throughput"] = speed.rates
    result["digest"] = R.weights_digest(gen)
    R.atomic_json(out / "train.json", R.rounded(result))
    log.info(f"teacher: {out / 'model'}; {json.dumps(R.rounded(result['timings']))}")
    return 0


if __name__ == "__main__":
    from flowtok_fast.cli_errors import run

    sys.exit(run("example shapes open_train", main, debug=bool(os.environ.get("FLOWTOK_DEBUG"))))
