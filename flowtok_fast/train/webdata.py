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
dali_pipeline.py, and `flowtok-fast index-shards` (shards.py) to write validated indices once
for both paths.)
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections import Counter, OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from flowtok_fast.train.shards import (  # noqa: F401 - also re-exported: the shard helpers lived here
    CAPTION_EXT, CORRUPT, EMPTY_SHARD, INDEX_VERSION, KINDS, MISSING_CAPTION, MISSING_IMAGE, MISSING_MOMENTS,
    MOMENTS_EXT, MOMENTS_SHAPE, UNREADABLE_SHARD, Sample, ShardTable, decode_caption, decode_moments, expand_braces,
    expand_shards, format_index, index_path, list_shard, main, read_index, scan_tar, split_name, write_index,
    write_shard,
)
from flowtok_fast.train.skips import SkipLog  # noqa: F401 - re-exported
from flowtok_fast.train.transforms import load_pixels

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- reading samples

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


if __name__ == "__main__":  # = flowtok-fast index-shards
    sys.exit(main())
