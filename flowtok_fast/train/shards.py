"""Webdataset shards on disk: finding them (directories, globs, brace patterns), listing their
samples without reading the data (tar headers, or DALI-format `.idx` files beside the shards),
writing shards and index files atomically, decoding a sample's caption and moments, and the table
of one process's usable samples. `flowtok-fast index-shards` (`main`) writes checked indices.

What is usable: unreadable or empty tars, samples missing their caption (or with an empty one)
and samples missing their image or moments are left out when a shard is listed, each counted by
reason; with `validate`, every sample is also decoded and the ones that fail are counted as
corrupt (DALI needs that: it cannot skip a bad image later). How the trainer reads the table in a
fixed, resumable order is webdata.py's.
"""
from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import re
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.train.transforms import IMAGE_EXTS, decode_rgb

log = logging.getLogger(__name__)

CAPTION_EXT = "txt"
MOMENTS_EXT = "token.npy"  # the reference's name; raw fp16 bytes despite the suffix
MOMENTS_SHAPE = (2 * TOKEN_CHANNELS, 1, NUM_TOKENS)
_MOMENTS_NUMEL = 2 * TOKEN_CHANNELS * NUM_TOKENS
KINDS = ("pixels", "moments")
INDEX_VERSION = "v1.2"

# skip reasons, as counted in `skipped`
EMPTY_SHARD, UNREADABLE_SHARD = "empty_shard", "unreadable_shard"
MISSING_CAPTION, MISSING_IMAGE, MISSING_MOMENTS = "missing_caption", "missing_image", "missing_moments"
CORRUPT = "corrupt"


# ---------------------------------------------------------------- shard lists and index files


def expand_shards(spec) -> list[str]:
    """Shard paths from a spec: a directory (its *.tar, sorted), a glob, a brace pattern
    (`data/{00000..00099}.tar`), or several of these joined by '::' or given as a list."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items or any(i is None for i in items):
        raise ValueError("no shards given: set data_path to a directory, glob or brace pattern of .tar shards")
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            if not part:
                continue
            if os.path.isdir(part):
                out += sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
                continue
            for path in _braceexpand(part):
                out += sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    out = list(dict.fromkeys(out))  # drop repeats, keep order
    if not out:
        raise FileNotFoundError(f"no .tar shards found for {spec!r}")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}")
    return out


def _braceexpand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # installed with webdataset
    except ImportError:
        return expand_braces(pattern)
    return list(braceexpand(pattern))


def expand_braces(pattern: str) -> list[str]:
    """'{000..002}' numeric ranges (zero padded like the first bound) and '{a,b}' lists: the
    shard patterns webdataset uses, for when the braceexpand package is missing."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = max(len(lo), len(hi)) if (lo.startswith("0") and len(lo) > 1) or (hi.startswith("0") and len(hi) > 1) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [x for c in choices for x in expand_braces(pattern[: m.start()] + c + pattern[m.end() :])]


def split_name(name: str) -> tuple[str, str]:
    """'dir/000123.token.npy' -> ('dir/000123', 'token.npy'): the key ends at the first dot of the
    file name, as in webdataset and DALI."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_path(shard: str, index_dir: str | None = None) -> str:
    """Where a shard's index lives: beside it (or in index_dir), with '.tar' replaced by '.idx'."""
    name = os.path.basename(shard)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    return os.path.join(index_dir or os.path.dirname(shard) or ".", stem + ".idx")


Sample = tuple[str, dict[str, tuple[int, int]]]  # key, {extension: (data offset, size)}


def scan_tar(path: str) -> tuple[list[Sample], bool]:
    """Samples of a tar from its headers (data is skipped, not read). Consecutive members with the
    same key form a sample. Returns (samples, complete): a tar that ends early or breaks keeps the
    samples read before the damage, and complete is False."""
    samples: list[Sample] = []
    size = os.path.getsize(path)
    if size == 0:
        return samples, True
    last = None
    complete = True
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if not ext or not os.path.basename(key) or os.path.basename(key).startswith("."):
                    continue
                if key != last:
                    samples.append((key, {}))
                    last = key
                samples[-1][1][ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError):
        complete = False
    # a truncated tar can list a member whose data runs past the end of the file
    samples = [(k, p) for k, p in samples if all(o + s <= size for o, s in p.values())]
    return samples, complete


def read_index(path: str) -> list[Sample]:
    """Samples from a DALI webdataset index (v1.2: 'ext offset size name' per component; v1.1:
    'ext offset size')."""
    with open(path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] not in ("v1.1", "v1.2"):
            raise ValueError(f"{path}: not a webdataset index (v1.1 / v1.2), header {header}")
        group = 4 if header[0] == "v1.2" else 3
        samples: list[Sample] = []
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if len(fields) % group:
                raise ValueError(f"{path}: malformed line {line.strip()!r}")
            key, parts = None, {}
            for j in range(0, len(fields), group):
                parts[fields[j].lower()] = (int(fields[j + 1]), int(fields[j + 2]))
                if group == 4 and key is None:
                    key = split_name(fields[j + 3])[0]
            samples.append((key if key is not None else f"{len(samples):08d}", parts))
    if len(samples) != int(header[1]):
        raise ValueError(f"{path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def format_index(samples: list[Sample]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, parts in samples:
        safe = "_".join(key.split())  # the format is whitespace separated
        lines.append(" ".join(f"{ext} {off} {size} {safe}.{ext}" for ext, (off, size) in parts.items()))
    return "\n".join(lines) + "\n"


def write_index(path: str, samples: list[Sample]) -> None:
    """Write a v1.2 index (readable by DALI's fn.readers.webdataset) atomically."""
    from flowtok_fast.checkpoint import _atomic_write

    text = format_index(samples)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_shard(path: str | os.PathLike, samples: list[dict]) -> None:
    """Write a webdataset tar atomically (temporary file + rename). Each sample is a dict with
    `__key__` and extension -> bytes (str is written as UTF-8). Members get mtime 0, so the same
    samples always give the same bytes."""
    from flowtok_fast.checkpoint import _atomic_write

    def write(tmp):
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext, data in sample.items():
                    if ext == "__key__":
                        continue
                    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    tar.addfile(info, io.BytesIO(data))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, write)


# ---------------------------------------------------------------- decoding one sample


def decode_caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def decode_moments(data: bytes) -> torch.Tensor:
    """`token.npy` bytes -> [32, 1, 77]: raw fp16 (the reference) or fp32, or a real .npy file."""
    if data[:6] == b"\x93NUMPY":
        array = np.load(io.BytesIO(data), allow_pickle=False)
    elif len(data) == 2 * _MOMENTS_NUMEL:
        array = np.frombuffer(data, dtype=np.float16)
    elif len(data) == 4 * _MOMENTS_NUMEL:
        array = np.frombuffer(data, dtype=np.float32)
    else:
        raise ValueError(f"{MOMENTS_EXT} has {len(data)} bytes, expected {2 * _MOMENTS_NUMEL} (fp16) or {4 * _MOMENTS_NUMEL} (fp32)")
    if array.size != _MOMENTS_NUMEL or array.dtype not in (np.float16, np.float32):
        raise ValueError(f"{MOMENTS_EXT} holds {array.dtype} {array.shape}, expected {MOMENTS_SHAPE} floats")
    tensor = torch.from_numpy(array.reshape(MOMENTS_SHAPE).copy())
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{MOMENTS_EXT} holds non-finite values")
    return tensor


# ---------------------------------------------------------------- the sample table of a process


def _select(samples: list[Sample], kind: str, skipped: Counter) -> list[Sample]:
    """Keep samples with a caption and an image (or moments), reduced to those two parts: the
    image part first, then the caption."""
    out = []
    for key, parts in samples:
        if kind == "pixels":
            main = next((e for e in IMAGE_EXTS if e in parts), None)
            missing = MISSING_IMAGE
        else:
            main = MOMENTS_EXT if MOMENTS_EXT in parts else None
            missing = MISSING_MOMENTS
        if main is None:
            skipped[missing] += 1
        elif CAPTION_EXT not in parts or parts[CAPTION_EXT][1] == 0:
            skipped[MISSING_CAPTION] += 1
        else:
            out.append((key, {main: parts[main], CAPTION_EXT: parts[CAPTION_EXT]}))
    return out


def _validates(f, kind: str, sample: Sample) -> bool:
    """Whether a sample reads and decodes (f: its shard, open for reading)."""
    (_, (off, size)), (_, (toff, tsize)) = sample[1].items()
    try:
        f.seek(off)
        data = f.read(size)
        f.seek(toff)
        text = f.read(tsize)
        if len(data) != size or len(text) != tsize or not decode_caption(text):
            return False
        decode_rgb(data) if kind == "pixels" else decode_moments(data)
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means a bad sample
        return False


def list_shard(path: str, kind: str, index_dir: str | None = None, *, use_index: bool = True,
               write: bool = False, validate: bool = False) -> tuple[list[Sample], Counter, bool]:
    """The usable samples of one shard (image-or-moments part, then caption) and the skip counts.

    Reads the shard's index when there is one no older than the shard (use_index), else scans the
    tar. validate decodes every sample and drops the ones that fail. write saves the result as the
    shard's index (only when it did not come from an index). Returns (samples, skipped, from_index).
    """
    skipped: Counter = Counter()
    idx = index_path(path, index_dir)
    samples = None
    if use_index and os.path.isfile(idx) and os.path.getmtime(idx) >= os.path.getmtime(path):
        try:
            samples = read_index(idx)
        except (ValueError, OSError) as err:
            log.warning("ignoring index %s (%s): scanning the tar instead", idx, err)
    from_index, complete = samples is not None, True
    if samples is None:
        samples, complete = scan_tar(path)
        if not complete:
            skipped[UNREADABLE_SHARD] += 1
            log.warning("%s is damaged or not a tar: kept the %d sample(s) listed before the damage", path, len(samples))
    else:
        size = os.path.getsize(path)
        samples = [(k, p) for k, p in samples if all(o + s <= size for o, s in p.values())]
    if not samples:
        if complete:
            skipped[EMPTY_SHARD] += 1
        return [], skipped, from_index
    samples = _select(samples, kind, skipped)
    if validate and samples:
        with open(path, "rb") as f:
            good = [s for s in samples if _validates(f, kind, s)]
        if len(good) < len(samples):
            skipped[CORRUPT] += len(samples) - len(good)
        samples = good
    if write and not from_index:
        try:
            write_index(idx, samples)
        except OSError as err:  # a read-only dataset: the listing is only a cache, carry on
            log.warning("cannot write index %s (%s): set data_index_dir to a writable directory to keep it", idx, err)
    return samples, skipped, from_index


class ShardTable:
    """The usable samples of this process's shards as compact arrays: per shard, int64 [n, 4]
    (offset, size of the image or moments; offset, size of the caption), the image extension of
    each sample and its key."""

    def __init__(self, paths: list[str], kind: str, parts: list[np.ndarray], exts: list[np.ndarray], keys: list[np.ndarray]):
        self.paths, self.kind, self.parts, self.exts, self.keys = paths, kind, parts, exts, keys
        self.sizes = np.array([len(p) for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @classmethod
    def build(cls, paths: list[str], kind: str, skipped: Counter, index_dir: str | None = None, *,
              use_index: bool = True, write: bool = False, validate: bool = False, threads: int = 1,
              progress: bool = False) -> "ShardTable":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

        def one(path):
            return list_shard(path, kind, index_dir, use_index=use_index, write=write, validate=validate)

        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max(1, threads)) as pool:
            listed = list(tqdm(pool.map(one, paths), total=len(paths), desc="listing shards", unit="shard",
                               disable=not progress or len(paths) < 8, leave=False))
        parts, exts, keys = [], [], []
        for samples, counts, _ in listed:
            skipped.update(counts)
            rows = np.zeros((len(samples), 4), dtype=np.int64)
            ext = np.zeros(len(samples), dtype=np.uint8)
            for i, (_, p) in enumerate(samples):
                (main, (off, size)), (_, (toff, tsize)) = p.items()
                rows[i] = (off, size, toff, tsize)
                ext[i] = IMAGE_EXTS.index(main) if main in IMAGE_EXTS else 255
            parts.append(rows)
            exts.append(ext)
            keys.append(np.array([k.encode() for k, _ in samples], dtype=bytes) if samples else np.zeros(0, dtype="S1"))
        return cls(list(paths), kind, parts, exts, keys)

    def key(self, shard: int, i: int) -> str:
        return self.keys[shard][i].decode()

    def image_ext(self, shard: int, i: int) -> str:
        return IMAGE_EXTS[self.exts[shard][i]] if self.kind == "pixels" else MOMENTS_EXT


# ---------------------------------------------------------------- index-shards


def main(argv: list[str] | None = None) -> int:
    """`flowtok-fast index-shards SHARDS` (= python -m flowtok_fast.train.webdata): write a
    (validated) index beside each shard."""
    p = OneLineParser(prog="flowtok-fast index-shards",
                                description="Write DALI-compatible .idx files listing each shard's usable samples.")
    p.add_argument("shards", nargs="+", help="directories, globs or brace patterns of .tar shards")
    p.add_argument("--kind", choices=KINDS, default="pixels")
    p.add_argument("--index-dir", default=None, help="write the indices here instead of beside the shards")
    p.add_argument("--no-validate", action="store_true", help="list structurally only: do not decode every sample")
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = expand_shards(args.shards)
    skipped: Counter = Counter()
    table = ShardTable.build(paths, args.kind, skipped, args.index_dir, use_index=False, write=True,
                             validate=not args.no_validate, threads=args.threads, progress=True)
    print(f"indexed {len(paths)} shard(s): {len(table)} usable samples; skipped: {dict(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
