"""Webdataset shards for training: images + captions, or pretokenised posterior moments + captions.

Shards are tar files in the webdataset layout: the members of a sample share a key
(`000123.jpg`, `000123.txt`). Two kinds are read:
  - pixels (data_source "webdataset"): an image (`jpg`, `jpeg`, `png` or `webp`) and a caption
    (`txt`); images are decoded, the shorter side resized (bicubic, antialiased) and center
    cropped to the tokenizer resolution (transforms.py), captions become CLIP ids;
  - moments (data_source "pretokenized"): `token.npy`, the tokenizer posterior [32, 1, 77] as raw
    fp16 bytes (the reference's pretokenised format; a real .npy file is accepted too), and `txt`.
    pretokenize.py writes these.

Order and position. Each process reads a fixed slice of the shard list: rank r of w takes shards
r::w. The process's samples are listed once at start-up, from an index file beside the shard when
there is one (DALI's `.idx` format, v1.1 or v1.2, e.g. written by `wds2idx` or dali_pipeline.py),
otherwise by scanning the tar headers (no data is read). Epoch e of rank r visits its shards in an
order drawn from (seed, e, r) and each shard's samples in an order drawn from (seed, e, r, shard);
micro-batch j of the epoch is the j-th run of `micro_batch` samples in that sequence (the tail that
does not fill a micro-batch is dropped, so every epoch has the same number of micro-batches). The
sequence is a function of (shards, seed, world size, rank, micro_batch) only: not of the number of
loader workers, not of timing. Samples are read by offset from the tar (random access), so a
micro-batch can be built anywhere in the sequence without reading what comes before it.

The DataLoader's workers build whole micro-batches: worker k of K builds micro-batches k, k+K,
k+2K, ... and the DataLoader hands them over in order (each batch carries its index and the source
checks it). The position saved in checkpoints is the number of samples this process has consumed
(the same on every rank: each consumes micro_batch * grad_accum per step). Resuming recomputes the
epoch and micro-batch from it: exact, in O(1), with any number of workers, as long as the shards,
world size, micro_batch and seed are unchanged. If those change the run still resumes at the same
fraction of data consumed, but the order after that point is a different one.

Robustness. Unreadable or empty tars, samples missing their caption (or an empty one) and samples
missing their image are left out when the shard is listed; images that fail to decode (corrupt,
truncated) and moments that fail to parse are found when the batch is built. Every case is counted
by reason (`source.skipped`) and logged; none stops a run. A sample that fails to decode keeps its
slot so batches keep their size (and positions stay exact): the slot repeats another sample of the
same micro-batch. (DALI cannot do that, so its index files are validated up front instead; see
dali_pipeline.py and `main` below to write validated indices once for both paths.)
"""
from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import re
import signal
import sys
import tarfile
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.train.skips import SkipLog
from flowtok_fast.train.transforms import IMAGE_EXTS, decode_rgb, load_pixels

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


class ShardFiles:
    """Reads byte ranges from shards, keeping a few files open. Opened lazily in each process (a
    handle inherited across fork would share its file position with the parent)."""

    def __init__(self, paths: list[str], max_open: int = 16):
        self.paths, self.max_open = paths, max_open
        self._pid, self._open = None, OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._pid, self._open = os.getpid(), OrderedDict()
        f = self._open.pop(shard, None)
        if f is None:
            f = open(self.paths[shard], "rb")
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[shard] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.paths[shard]}: short read at {offset} ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __getstate__(self):
        return {"paths": self.paths, "max_open": self.max_open, "_pid": None, "_open": OrderedDict()}


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


def _seed(*values: int) -> list[int]:
    return [int(v) & 0xFFFFFFFFFFFFFFFF for v in values]


class EpochPlan:
    """The order of one process's samples: epoch e permutes the shards by (seed, e, rank) and each
    shard's samples by (seed, e, rank, shard), then drops the tail that does not fill a
    micro-batch. Micro-batch n of the whole run is micro-batch n % B of epoch n // B."""

    def __init__(self, table: ShardTable, micro_batch: int, seed: int = 0, rank: int = 0):
        self.table, self.micro_batch, self.seed, self.rank = table, micro_batch, seed, rank
        self.batches_per_epoch = len(table) // micro_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"rank {rank} has {len(table)} usable sample(s) in {len(table.paths)} shard(s), fewer than one "
                f"micro-batch ({micro_batch}): add data or lower micro_batch"
            )
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sample index) of every sample of the epoch, in order."""
        if epoch in self._cache:
            return self._cache[epoch]
        sizes = self.table.sizes
        shard_order = np.random.default_rng(_seed(self.seed, epoch, self.rank)).permutation(len(sizes))
        shards, samples = [], []
        for s in shard_order:
            if sizes[s]:
                shards.append(np.full(sizes[s], s, dtype=np.int32))
                samples.append(np.random.default_rng(_seed(self.seed, epoch, self.rank, s, 1)).permutation(sizes[s]).astype(np.int32))
        n = self.batches_per_epoch * self.micro_batch
        order = (np.concatenate(shards)[:n], np.concatenate(samples)[:n])
        self._cache[epoch] = order
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return order

    def locate(self, batch: int) -> tuple[int, int]:
        """Micro-batch number of the run -> (epoch, micro-batch within the epoch)."""
        return divmod(batch, self.batches_per_epoch)

    def entries(self, batch: int) -> list[tuple[int, int]]:
        epoch, j = self.locate(batch)
        shards, samples = self.order(epoch)
        lo, hi = j * self.micro_batch, (j + 1) * self.micro_batch
        return list(zip(shards[lo:hi].tolist(), samples[lo:hi].tolist()))


# ---------------------------------------------------------------- building micro-batches


class BatchMaker:
    """Micro-batch n -> a batch dict (data.py's contract) plus `keys`, `captions`, `index` and
    `skipped` (reason -> count for this batch)."""

    def __init__(self, table: ShardTable, plan: EpochPlan, resolution: int, tokenize_captions: bool = True):
        self.table, self.plan, self.resolution = table, plan, resolution
        self.tokenize_captions = tokenize_captions
        self.files = ShardFiles(table.paths)

    def load(self, shard: int, i: int):
        """(caption, tensor) or None when the sample fails to read or decode."""
        off, size, toff, tsize = self.table.parts[shard][i].tolist()
        try:
            caption = decode_caption(self.files.read(shard, toff, tsize))
            data = self.files.read(shard, off, size)
            if not caption:
                return None
            if self.table.kind == "pixels":
                return caption, load_pixels(data, self.resolution)
            return caption, decode_moments(data)
        except Exception as err:  # noqa: BLE001 - a bad sample must not stop the run
            log.debug("skipping %s in %s: %s", self.table.key(shard, i), self.table.paths[shard], err)
            return None

    def make(self, n: int) -> dict:
        entries = self.plan.entries(n)
        items = [self.load(s, i) for s, i in entries]
        bad = [k for k, item in enumerate(items) if item is None]
        if len(bad) == len(items):
            items[0], entries[0] = self._first_good_after(n)
        good = [k for k, item in enumerate(items) if item is not None]
        for k in bad:  # the next good slot, cyclically: deterministic, keeps the batch size
            src = next((g for g in good if g > k), good[0])
            items[k], entries[k] = items[src], entries[src]
        captions = [c for c, _ in items]
        tensors = [t for _, t in items]
        if len({t.dtype for t in tensors}) > 1:
            tensors = [t.float() for t in tensors]
        batch = {
            "pixels" if self.table.kind == "pixels" else "moments": torch.stack(tensors),
            "captions": captions,
            "keys": [self.table.key(s, i) for s, i in entries],
            "index": n,
            "skipped": {CORRUPT: len(bad)} if bad else {},
        }
        if self.tokenize_captions:
            from flowtok_fast.models.text import tokenize

            batch["ids"] = tokenize(captions)
        else:
            batch["text"] = captions
        return batch

    def _first_good_after(self, n: int):
        """Every sample of micro-batch n failed: the first good sample after it in the epoch."""
        epoch, j = self.plan.locate(n)
        shards, samples = self.plan.order(epoch)
        mb = self.plan.micro_batch
        for pos in list(range((j + 1) * mb, len(shards))) + list(range(0, j * mb)):
            item = self.load(int(shards[pos]), int(samples[pos]))
            if item is not None:
                return item, (int(shards[pos]), int(samples[pos]))
        raise RuntimeError(f"no sample of rank {self.plan.rank}'s shards decodes: check the data ({self.table.paths[:3]} ...)")


class BatchStream(IterableDataset):
    """Micro-batches start, start+1, ... forever; DataLoader worker k of K makes start+k, start+k+K, ..."""

    def __init__(self, maker: BatchMaker, start: int = 0):
        self.maker, self.start = maker, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, K = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self.start + k
        while True:
            yield self.maker.make(n)
            n += K


# ---------------------------------------------------------------- the trainer-facing source


def _ignore_sigint(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the loader workers too: they keep loading, so the trainer can
    finish its step and save (it stops them when it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WebDatasetSource:
    """Training batches from webdataset shards (see the module docstring): `next_step()` gives this
    process's grad_accum micro-batches for one optimizer step, as [(global micro-batch index,
    batch)], like data.ShardedBatches; `state_dict()` / `load_state_dict()` save and restore the
    position ({'samples': samples consumed by this process})."""

    def __init__(self, shards, kind: str, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, resolution: int = 256, num_workers: int = 4, index_dir: str | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, progress: bool = True):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch * world_size = {micro_batch * world_size}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.micro_batch, self.rank, self.world_size = kind, micro_batch, rank, world_size
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        paths = expand_shards(shards)
        if len(paths) < world_size:
            raise ValueError(f"{len(paths)} shard(s) for {world_size} processes: rank r reads shards r::{world_size}, so every rank needs one")
        self.shards = paths[rank::world_size]
        name = "pretokenized shards" if kind == "moments" else "webdataset shards"
        self.skips = SkipLog(f"{name} (rank {rank})")
        self.table = ShardTable.build(self.shards, kind, self.skips.counts, index_dir,
                                      threads=min(8, max(1, num_workers)), progress=progress and rank == 0)
        self.plan = EpochPlan(self.table, micro_batch, seed, rank)
        self.maker = BatchMaker(self.table, self.plan, resolution)
        self.batches = 0  # micro-batches consumed by this process
        self._loader = self._it = None
        if rank == 0:
            log.info("%s: rank 0 reads %d of %d shard(s), %d usable samples, %d micro-batches of %d per epoch",
                     name, len(self.shards), len(paths), len(self.table), self.plan.batches_per_epoch, micro_batch)
        self.skips.maybe_log(force=True)

    @property
    def skipped(self) -> Counter:
        """Samples and shards skipped so far, by reason (listing, plus the batches consumed)."""
        return self.skips.counts

    @property
    def epoch(self) -> int:
        return self.plan.locate(self.batches)[0]

    def _iterator(self):
        if self._it is None:
            stream = BatchStream(self.maker, self.batches)
            if self.num_workers == 0:
                self._it = iter(stream)
            else:
                self._loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                          prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                          worker_init_fn=_ignore_sigint)
                self._it = iter(self._loader)
        return self._it

    def next_batch(self) -> dict:
        batch = next(self._iterator())
        index = int(batch.pop("index"))
        if index != self.batches:
            raise RuntimeError(f"data loader gave micro-batch {index}, expected {self.batches}")
        self.batches += 1
        self.skips.add(batch.pop("skipped"))
        return batch

    def next_step(self) -> list[tuple[int, dict]]:
        return [(self.rank * self.grad_accum + m, self.next_batch()) for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"samples": self.batches * self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        samples = int(state["samples"])
        if samples % self.micro_batch:
            log.warning("resumed position %d samples is not a multiple of micro_batch %d: rounding down", samples, self.micro_batch)
        self.close()
        self.batches = samples // self.micro_batch

    def close(self) -> None:
        """Stop the loader workers (a later next_step starts new ones)."""
        self._it = self._loader = None  # the DataLoader iterator shuts its workers down when collected
        self.maker.files.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------- writing index files


def main(argv: list[str] | None = None) -> int:
    """`flowtok-fast index-shards SHARDS` (= python -m flowtok_fast.train.webdata): write a
    (validated) index beside each shard."""
    p = argparse.ArgumentParser(prog="flowtok-fast index-shards",
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
