"""`flowtok-fast export-model CHECKPOINT_DIR --out MODEL_DIR [--ema]`: a training checkpoint ->
a model directory (config.json + model.safetensors) that `generate` / `caption --model-dir`,
`FlowTokPipeline.from_pretrained` and `FlowTokCaptioner.from_pretrained` load.

The checkpoint gives the generator (its raw weights, or with --ema the EMA average of its
parameters) and, for image-to-text, the text decoder; its `train_config.json` gives the model
shape, the direction and the frozen networks' files: CLIP (`clip_weights`, text-to-image) and
the image tokenizer (`tokenizer_weights`: its decoder draws the images, its encoder reads them
for captions). `--clip` / `--tokenizer` replace those paths (e.g. when the files moved). The
tiny test model trains on random frozen networks when no files are named: they are rebuilt
from the run's seed exactly as the trainer built them, and a tokenizer that training never had
(no encoder in use) is random: such a directory loads and runs, but its images are noise.

Nothing is unpickled without restriction (checkpoint metadata: dcp_safe.py), and the directory
appears complete or not at all: written beside MODEL_DIR, then renamed into place.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast import checkpoint as ckpt
from flowtok_fast.errors import UserError
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import ClipTextEncoder, TextDecoder
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.objective import DIRECTIONS
from flowtok_fast.train import checkpoint as train_ckpt
from flowtok_fast.train.config import TrainConfig

log = logging.getLogger(__name__)

PROVENANCE_FILE = "training.json"  # where the weights came from; the loaders ignore it


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run's output_dir (then its newest checkpoint)."""
    path = Path(path)
    if (path / ".metadata").is_file() or (path / train_ckpt.CONFIG_FILE).is_file():
        return path
    found = train_ckpt.list_checkpoints(path) if path.is_dir() else []
    if found:
        log.info("using the newest checkpoint of %s: %s", path, found[-1].name)
        return found[-1]
    what = "does not exist" if not path.exists() else "is not a directory" if not path.is_dir() else "holds no checkpoint"
    raise UserError(f"{path} {what}: expected a training checkpoint (OUTPUT_DIR/checkpoints/step_N, with .metadata "
                    f"and {train_ckpt.CONFIG_FILE}) or a run's OUTPUT_DIR")


def train_config(checkpoint: Path) -> TrainConfig:
    """The generator run's TrainConfig from `train_config.json`, each problem named."""
    raw = train_ckpt.read_config(checkpoint)
    source = checkpoint / train_ckpt.CONFIG_FILE
    if "direction" not in raw and "encoder_width" in raw:
        raise UserError(f"{source}: a tokenizer training checkpoint, not a generator one: export it with "
                        "`flowtok-fast train-tokenizer CONFIG resume=auto steps=N --export DIR`")
    if raw.get("direction", "t2i") not in DIRECTIONS:
        raise UserError(f"{source}: unknown direction {raw['direction']!r}: expected one of {DIRECTIONS}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {unknown}: not a flowtok-fast generator training config")
    try:
        return TrainConfig(**raw)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: {err}") from None


def _require_files(cfg: TrainConfig, clip_path: str | None, tokenizer_path: str | None, source: Path) -> None:
    """Random frozen networks exist only for the tiny model: every other needs its files."""
    name = cfg.model_config().name
    if name == "tiny":
        return
    for path, key, flag, needed in ((clip_path, "clip_weights", "--clip", cfg.direction == "t2i"),
                                    (tokenizer_path, "tokenizer_weights", "--tokenizer", True)):
        if needed and not path:
            raise UserError(f"{source} names no {key} (model {name}): pass {flag} FILE")


def _weights_file(override: str | None, configured: str | None, key: str, flag: str, source: Path) -> str | None:
    """The file to load for `key` (the --flag value, else the config's), checked to exist."""
    path = override or configured
    if path and not Path(path).is_file():
        named = f"{flag} {path}" if override else f"{source} names {key}={path}, which"
        raise UserError(f"{named} is not a file" + ("" if override else f": pass {flag} FILE"))
    return path


def read_generator_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor under `model.` and `ema.` in the checkpoint, flat ("model.generator.x", "ema.x")."""
    metadata = train_ckpt.read_metadata(checkpoint)
    state = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in metadata.state_dict_metadata.items()
             if isinstance(md, TensorStorageMetadata) and k.split(".", 1)[0] in ("model", "ema")}
    if not any(k.startswith("model.generator.") for k in state):
        raise UserError(f"{checkpoint}: no generator weights (model.generator.*): not a generator training checkpoint")
    train_ckpt.load_tensors(checkpoint, state)
    return state


def _load(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load; tensors whose shape differs only by size-1 dims (t2t_temperature trains as
    [1], is stored as []) take the module's shape."""
    own = module.state_dict()
    sd = {k: v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and v.numel() == own[k].numel() else v
          for k, v in sd.items()}
    ckpt.load_strict(module, sd, what)


def build_generator(cfg: TrainConfig, weights: dict, use_ema: bool, checkpoint: Path) -> FlowTokGenerator:
    model_cfg = cfg.model_config()
    gen = FlowTokGenerator(model_cfg.generator, model_cfg.text_vae)
    sd = {k.removeprefix("model.generator."): v for k, v in weights.items() if k.startswith("model.generator.")}
    if use_ema:
        ema = {k.removeprefix("ema."): v for k, v in weights.items() if k.startswith("ema.")}
        if not ema:
            raise UserError(f"{checkpoint}: holds no EMA weights: export without --ema")
        stray = sorted(set(ema) - set(sd))
        if stray:
            raise UserError(f"{checkpoint}: EMA entries {stray[:5]} match no generator weight")
        sd.update(ema)  # parameters averaged; buffers as trained
    _load(gen, sd, f"{checkpoint} [generator{' EMA' if use_ema else ''}]")
    return gen.eval()


def build_text_decoder(cfg: TrainConfig, weights: dict, checkpoint: Path) -> TextDecoder:
    model_cfg = cfg.model_config()
    sd = {k.removeprefix("model.text_decoder."): v for k, v in weights.items() if k.startswith("model.text_decoder.")}
    if not sd:
        raise UserError(f"{checkpoint}: an image-to-text run without a text decoder (text_decoder=false): "
                        "captioning needs one; train with text_decoder=true")
    dec = TextDecoder(model_cfg.text_vae, model_cfg.clip.vocab_size)
    _load(dec, sd, f"{checkpoint} [text_decoder]")
    return dec.eval()


def build_frozen_parts(cfg: TrainConfig, clip_path: str | None, tokenizer_path: str | None, source: Path):
    """(CLIP text tower, FlowTiTok): from the files, or for the tiny model without files, rebuilt
    from the run's seed as the trainer built them (frozen.build_frozen)."""
    from flowtok_fast.train.frozen import build_frozen

    model_cfg = cfg.model_config()
    i2t = cfg.direction == "i2t"
    tiny = model_cfg.name == "tiny"
    clip = random_image = None
    if tiny and (not clip_path or not tokenizer_path):
        torch.manual_seed(cfg.seed)  # the trainer's order: CLIP first, then the image encoder
        frozen = build_frozen(model_cfg, clip_path, None, with_image=i2t)
        clip, random_image = frozen.clip, frozen.image
    if clip is None and not i2t:
        clip = ClipTextEncoder(model_cfg.clip)
        ckpt.load_clip(clip, clip_path)
    tokenizer = FlowTiTok(model_cfg.tokenizer, with_encoder=i2t)
    if tokenizer_path:
        ckpt.load_tokenizer(tokenizer, tokenizer_path)
    else:
        if i2t and cfg.data_kind == "pixels":
            result = tokenizer.load_state_dict(random_image.state_dict(), strict=False)  # the encoder training used
            if result.unexpected_keys:
                raise RuntimeError(f"image encoder keys unknown to FlowTiTok: {result.unexpected_keys[:5]}")
        log.warning("%s names no tokenizer_weights: the exported tokenizer's %s random weights (the tiny test "
                    "model); pass --tokenizer FILE for a real one", source,
                    "encoder and decoder have" if i2t and cfg.data_kind != "pixels" else "decoder has")
    return clip, tokenizer


def _check_out(out: Path) -> None:
    """Refuse --out problems before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a directory to create")
    if out.is_dir() and any(out.iterdir()) and not (out / ckpt.CONFIG_FILE).is_file():
        raise UserError(f"--out {out} exists and is not a model directory: choose a new or empty directory")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory into place (an older model directory there is replaced)."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "model")
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(checkpoint: str | Path, out: str | Path, use_ema: bool = False, clip: str | None = None,
                 tokenizer: str | None = None) -> Path:
    """Write the model directory; returns it."""
    out = Path(out)
    _check_out(out)
    checkpoint = find_checkpoint(checkpoint)
    raw = train_ckpt.read_config(checkpoint)
    if "teacher" in raw:  # a distillation run: the student beside its teacher's other networks
        from flowtok_fast.train.distill_export import export_from_checkpoint

        return export_from_checkpoint(checkpoint, raw, out, use_ema)
    cfg = train_config(checkpoint)
    source = checkpoint / train_ckpt.CONFIG_FILE
    i2t = cfg.direction == "i2t"
    clip_path = None if i2t else _weights_file(clip, cfg.clip_weights, "clip_weights", "--clip", source)
    tok_path = _weights_file(tokenizer, cfg.tokenizer_weights, "tokenizer_weights", "--tokenizer", source)
    _require_files(cfg, clip_path, tok_path, source)
    weights = read_generator_weights(checkpoint)
    generator = build_generator(cfg, weights, use_ema, checkpoint)
    decoder = build_text_decoder(cfg, weights, checkpoint) if i2t else None
    clip_m, tok_m = build_frozen_parts(cfg, clip_path, tok_path, source)
    components = {"tokenizer": tok_m, "generator": generator, "text_decoder": decoder} if i2t else \
        {"generator": generator, "tokenizer": tok_m, "clip": clip_m}

    provenance = {"checkpoint": str(checkpoint.resolve()), "step": checkpoint_step(checkpoint), "ema": use_ema,
                  "direction": cfg.direction, "clip_weights": clip_path, "tokenizer_weights": tok_path,
                  "train_config": cfg.to_dict()}
    return write_model_directory(out, cfg.model_config(), components, provenance)


def checkpoint_step(checkpoint: Path) -> int | None:
    return int(checkpoint.name.removeprefix("step_")) if checkpoint.name.startswith("step_") else None


def write_model_directory(out: Path, config, components: dict, provenance: dict, **save_kw) -> Path:
    """config.json + model.safetensors (checkpoint.save_pretrained, `save_kw`) + training.json,
    written beside `out` and moved into place (an older model directory there is replaced):
    the directory is complete or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        ckpt.save_pretrained(tmp, config, components, **save_kw)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and the atomic writes make everything private
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="flowtok-fast export-model",
        description="Turn a training checkpoint (text-to-image or image-to-text) into a model directory for "
                    "`generate --model-dir` / `caption --model-dir`.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="OUTPUT_DIR/checkpoints/step_N, or a run's OUTPUT_DIR (its newest checkpoint)")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="the model directory to write (config.json + model.safetensors)")
    parser.add_argument("--ema", action="store_true", help="the generator's EMA weights (usually better samples) instead of the raw ones")
    parser.add_argument("--clip", metavar="FILE", help="CLIP weights, instead of the training config's clip_weights (text-to-image)")
    parser.add_argument("--tokenizer", metavar="FILE", help="image tokenizer weights, instead of the training config's tokenizer_weights")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory at --out")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if (out / ckpt.CONFIG_FILE).is_file() and not args.force:  # as `flowtok-fast export`: never replaced silently
        raise UserError(f"--out {out} exists and holds a model: pass --force to replace it")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = export_model(args.checkpoint, args.out, args.ema, args.clip, args.tokenizer)
    cfg = json.loads((out / PROVENANCE_FILE).read_text())
    verb = "caption IMAGE" if cfg["direction"] == "i2t" else 'generate --prompt "..."'
    print(f"wrote {out} ({cfg['direction']}, step {cfg['step']}, {'EMA' if args.ema else 'raw'} generator weights); "
          f"use it with: flowtok-fast {verb} --model-dir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
