"""`flowtok-fast pretokenize`: image + caption shards -> posterior moments + caption shards.

Each input shard (webdataset layout: `jpg`/`jpeg`/`png`/`webp` + `txt`) becomes an output shard
of the same name holding, per sample, `token.npy` (the FlowTiTok encoder's posterior moments
[32, 1, 77] as raw fp16 bytes: mean channels 0..15, logvar 16..31, the reference's pretokenised
format) and `txt` (the caption). Training reads them with data_source=pretokenized: no image
decoding and no tokenizer encoder at train time, and the posterior is still sampled every step.

Images get the training transform (transforms.py: shorter side resized bicubic + center crop to
the tokenizer's resolution). Corrupt images, samples without a caption and empty shards are skipped
and counted. An output shard is written to a temporary file and renamed into place when complete,
so an interrupted run leaves no partial shard and a rerun skips the shards already done (pass
--overwrite to redo them). Several processes split the input shards r::w (--rank/--world-size, or
RANK/WORLD_SIZE as torchrun sets them), each on its own GPU (LOCAL_RANK).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flowtok_fast.configs import NUM_TOKENS, TINY, TokenizerConfig
from flowtok_fast.errors import UserError
from flowtok_fast.train.frozen import ImageEncoder
from flowtok_fast.train.transforms import load_pixels
from flowtok_fast.train.webdata import (
    CAPTION_EXT, CORRUPT, MOMENTS_EXT, ShardFiles, ShardTable, decode_caption, expand_shards, write_shard,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the encoder


def load_encoder(tokenizer: str | None = None, resolution: int | None = None, config: str = "published",
                 seed: int = 0) -> ImageEncoder:
    """FlowTiTok's encoder half from a local file (FlowTiTok_*.bin / .safetensors, or a
    flowtok-fast model directory), or random weights when tokenizer is None (tests and demos).
    config: 'published' (the released tokenizer's sizes) or 'tiny'."""
    from flowtok_fast import checkpoint as ckpt

    if config not in ("published", "tiny"):
        raise UserError(f"config must be 'published' or 'tiny', got {config!r}")
    sd = None
    if tokenizer is not None:
        if os.path.isdir(tokenizer):
            _, parts = ckpt.read_pretrained(tokenizer)
            if "tokenizer" not in parts:
                raise ckpt.CheckpointError(f"{tokenizer} holds no tokenizer (components: {sorted(parts)})")
            sd = parts["tokenizer"]
        else:
            sd = ckpt.read_state_dict(tokenizer)
        sd = {k: v for k, v in sd.items() if k == "latent_tokens" or k.startswith("encoder.")}
        if "encoder.positional_embedding.freqs_cos" not in sd:
            raise ckpt.CheckpointError(f"{tokenizer} has no FlowTiTok encoder weights (a decode-only tokenizer?)")
        grid = math.isqrt(sd["encoder.positional_embedding.freqs_cos"].shape[0])
        resolution = resolution or grid * 16
    if config == "tiny":
        cfg = TINY.tokenizer
    else:
        cfg = TokenizerConfig(resolution=resolution or 256)
    torch.manual_seed(seed)
    encoder = ImageEncoder(cfg)
    if sd is not None:
        ckpt.check_tokenizer_tables(sd, cfg, f"tokenizer {tokenizer}")
        ckpt.load_strict(encoder, sd, f"tokenizer {tokenizer} [encoder]")
    return encoder.eval().requires_grad_(False)


# ---------------------------------------------------------------- reading the inputs in order


class _Samples(Dataset):
    """Every usable sample of the table, shard by shard, in the shards' own order."""

    def __init__(self, table: ShardTable, resolution: int):
        self.table, self.resolution = table, resolution
        self.entries = [(s, i) for s in range(len(table.paths)) for i in range(int(table.sizes[s]))]
        self.files = ShardFiles(table.paths)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, k: int):
        s, i = self.entries[k]
        off, size, toff, tsize = self.table.parts[s][i].tolist()
        try:
            caption = decode_caption(self.files.read(s, toff, tsize))
            pixels = load_pixels(self.files.read(s, off, size), self.resolution) if caption else None
        except Exception as err:  # noqa: BLE001 - a bad sample is counted, not fatal
            log.debug("skipping %s: %s", self.table.key(s, i), err)
            caption, pixels = None, None
        return s, self.table.key(s, i), caption, pixels


def _collate(items):
    return items


# ---------------------------------------------------------------- the job


def pretokenize(shards, out_dir: str, encoder: ImageEncoder, *, batch_size: int = 64, device=None,
                precision: str = "auto", workers: int = 4, rank: int = 0, world_size: int = 1,
                overwrite: bool = False, progress: bool = True, index_dir: str | None = None) -> dict:
    """Encode this process's share of `shards` (r::w) into `out_dir`; returns counts:
    written/existing shards, samples written, and skipped samples by reason."""
    from tqdm.auto import tqdm

    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    paths = expand_shards(shards)
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise UserError("input shards must have distinct file names: each becomes the output shard of the same name")
    mine = paths[rank::world_size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = {p: out / os.path.basename(p) for p in mine}
    todo = [p for p in mine if overwrite or not target[p].exists()]
    stats = {"shards_written": 0, "shards_existing": len(mine) - len(todo), "samples": 0, "skipped": Counter()}
    if stats["shards_existing"]:
        log.info("pretokenize: %d shard(s) already done in %s (pass overwrite to redo)", stats["shards_existing"], out)
    if not todo:
        return stats
    table = ShardTable.build(todo, "pixels", stats["skipped"], index_dir, threads=min(8, max(1, workers)))
    for s, path in enumerate(todo):
        if table.sizes[s] == 0:
            log.warning("pretokenize: %s has no usable sample: no output shard", path)
    encoder = encoder.to(device).eval()
    resolution = encoder.cfg.resolution
    data = _Samples(table, resolution)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    remaining = table.sizes.copy()
    pending: dict[int, list] = {}

    def finish(s: int) -> None:
        records = pending.pop(s, [])
        if not records:
            return
        write_shard(target[todo[s]], records)
        stats["shards_written"] += 1
        stats["samples"] += len(records)

    bar = tqdm(total=len(data), desc="pretokenize", unit="img", disable=not progress)
    with torch.no_grad():
        for items in loader:
            good = [it for it in items if it[3] is not None]
            stats["skipped"][CORRUPT] += len(items) - len(good)
            if good:
                pixels = torch.stack([it[3] for it in good]).to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    moments = encoder(pixels)
                moments = moments.float().half().cpu().numpy()  # [B, 32, 1, 77] fp16
                for (s, key, caption, _), m in zip(good, moments):
                    pending.setdefault(s, []).append({"__key__": key, MOMENTS_EXT: np.ascontiguousarray(m).tobytes(), CAPTION_EXT: caption})
            for s, *_ in items:
                remaining[s] -= 1
                if remaining[s] == 0:
                    finish(s)
            bar.update(len(items))
    bar.close()
    for s in list(pending):  # cannot happen unless the counts disagree; never lose encoded data
        finish(s)
    skipped = {k: v for k, v in stats["skipped"].items() if v}
    log.info("pretokenize: wrote %d shard(s), %d samples to %s; skipped: %s", stats["shards_written"], stats["samples"],
             out, skipped or "none")
    return stats


def main(argv: list[str] | None = None) -> int:
    from flowtok_fast.cli_errors import OneLineParser

    p = OneLineParser(
        prog="flowtok-fast pretokenize",
        description="Encode image + caption webdataset shards into tokenizer posterior moments (fp16) + caption "
                    "shards for data_source=pretokenized.",
    )
    p.add_argument("shards", nargs="+", help="input shards: directories, globs or brace patterns of .tar files")
    p.add_argument("--out", required=True, help="output directory (one output shard per input shard, same name)")
    p.add_argument("--tokenizer", help="FlowTiTok weights (FlowTiTok_256.bin / FlowTiTok_512.bin, .safetensors, or a "
                                       "flowtok-fast model directory); local files only")
    p.add_argument("--random-weights", action="store_true", help="random encoder weights (tests and demos)")
    p.add_argument("--config", choices=("published", "tiny"), default="published", help="tokenizer sizes")
    p.add_argument("--resolution", type=int, default=None, help="default: from the weights (256 or 512); 256 with --random-weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA (as training encodes online), fp32 on CPU")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--index-dir", default=None, help="where the input shards' .idx files are, if not beside them")
    p.add_argument("--overwrite", action="store_true", help="redo output shards that already exist")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.tokenizer and not args.random_weights:
        p.error("pass --tokenizer FILE (a local FlowTiTok checkpoint) or --random-weights")
    if not 0 <= args.rank < args.world_size:
        p.error(f"--rank {args.rank} is not in [0, {args.world_size})")
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--threads", 1 if args.threads is None else args.threads, 1),
                             ("--resolution", 16 if args.resolution is None else args.resolution, 16)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_weights:
        log.warning("pretokenize: the encoder has random weights: the moments are meaningless (tests and demos only)")
    encoder = load_encoder(None if args.random_weights else args.tokenizer, args.resolution, args.config)
    device = args.device
    if device is not None:
        from flowtok_fast.validate import resolve_device

        resolve_device(device)  # 'cuda' without CUDA, a misspelt device: one clear line
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    stats = pretokenize(args.shards, args.out, encoder, batch_size=args.batch_size, device=device,
                        precision=args.precision, workers=args.workers, rank=args.rank, world_size=args.world_size,
                        overwrite=args.overwrite, progress=not args.no_progress and args.rank == 0,
                        index_dir=args.index_dir)
    skipped = {k: v for k, v in stats["skipped"].items() if v}
    print(f"pretokenize: {stats['shards_written']} shard(s) written, {stats['shards_existing']} already there, "
          f"{stats['samples']} samples [{NUM_TOKENS} tokens, fp16 moments] -> {args.out}; skipped: {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
