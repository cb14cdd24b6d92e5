"""NVIDIA DALI input pipeline for webdataset shards of images + captions (data_source "dali").

The same samples in the same order as webdata.WebDatasetSource, decoded by DALI:
`fn.readers.webdataset` (driven by index files) -> `fn.decoders.image` (device "mixed": nvJPEG on
the GPU; "cpu" when device_id is None) -> `fn.resize` of the shorter side (cubic, antialiased) ->
centered `fn.slice` -> CHW float in [0, 1], handed to PyTorch by `DALIGenericIterator`. Sizes and
crop offsets are computed in the graph with torchvision's rounding (transforms.py), EXIF
orientation is ignored as PIL does, and the GPU decoder uses libjpeg's "fancy" chroma upsampling,
so the two paths differ only by decoder/resampler rounding (CPU decoder: at most 1/255, tested).

How the order is imposed: for each epoch the source writes temporary index files (DALI's v1.2
`.idx` format) that list this rank's samples in the epoch's order (webdata.EpochPlan), starting at
the resumed micro-batch, and runs the reader over them without shuffling; DALI reads the samples
in the order the indices list them. So the position is exact and O(1) to restore, and the batches
are the PyTorch path's.

Bad samples: DALI cannot skip an image it fails to decode, so the samples are validated when a
shard is first listed (every image decoded once with PIL): corrupt images, samples without a
caption and empty shards are left out (and counted). The validated listing is cached as the
shard's `.idx` beside it (or in index_dir; skipped with a warning if not writable), so later runs
start at once. An index that already exists is trusted as is: one written by DALI's `wds2idx`
lists corrupt images too, and DALI stops on them. Write validated indices ahead of a long run with
`python -m flowtok_fast.train.webdata SHARDS` (the PyTorch path reads them as well).

Rank r of w reads shards r::w (each process builds its own pipeline over its slice).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np

from flowtok_fast.train.transforms import IMAGE_EXTS
from flowtok_fast.train.webdata import CAPTION_EXT, EpochPlan, ShardTable, SkipLog, expand_shards, format_index

log = logging.getLogger(__name__)

READER = "reader"
_INSTALL = "NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 (or the wheel for your CUDA version)"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _round_half_even_half(d):
    """round(d / 2) with halves to even, on integer DataNodes (torchvision's crop offset)."""
    q = d // 2
    return q + (d - 2 * q) * (q - 2 * (q // 2))


def build_pipeline(paths: list[str], index_paths: list[str], batch_size: int, resolution: int,
                   device_id: int | None = None, num_threads: int = 4, prefetch: int = 2, seed: int = 0):
    """A DALI pipeline over `paths` (read in the order their indices list), yielding
    (pixels [B,3,S,S] float in [0,1], caption bytes [B, L] uint8, zero padded)."""
    try:
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    size = resolution
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipeline():
        encoded, caption = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=[";".join(IMAGE_EXTS), CAPTION_EXT],
            missing_component_behavior="error", random_shuffle=False, name=READER,
        )
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)  # [H, W, C] before decoding
        h, w = shape[0], shape[1]
        short = dmath.min(h, w)
        new_h, new_w = (h * size) // short, (w * size) // short  # torchvision: int(size * long / short)
        extra = {"jpeg_fancy_upsampling": True} if gpu else {}
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False, **extra)
        images = fn.resize(images, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT),
                           interp_type=types.INTERP_CUBIC, antialias=True)  # uint8 out, like PIL
        start = fn.cast(fn.stack(_round_half_even_half(new_h - size), _round_half_even_half(new_w - size)), dtype=types.INT32)
        images = fn.slice(images, start=start, shape=np.array([size, size], dtype=np.int32), axis_names="HW")
        images = fn.crop_mirror_normalize(images, mean=0.0, std=255.0, output_layout="CHW", dtype=types.FLOAT)
        return images, fn.pad(caption, fill_value=0)

    return pipeline()


class DaliSource:
    """Training batches through DALI, with the interface of data.ShardedBatches and
    webdata.WebDatasetSource (next_step, state_dict = {'samples': consumed}, load_state_dict).
    device_id: the CUDA device to decode on, or None for DALI's CPU pipeline."""

    def __init__(self, shards, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 resolution: int = 256, device_id: int | None = None, num_threads: int = 4, index_dir: str | None = None,
                 validate: bool = True, prefetch: int = 2, progress: bool = True):
        if not dali_available():
            raise ImportError(_INSTALL)
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch * world_size = {micro_batch * world_size}")
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.resolution, self.device_id, self.num_threads, self.prefetch = resolution, device_id, num_threads, prefetch
        paths = expand_shards(shards)
        if len(paths) < world_size:
            raise ValueError(f"{len(paths)} shard(s) for {world_size} processes: rank r reads shards r::{world_size}, so every rank needs one")
        self.shards = paths[rank::world_size]
        self.skips = SkipLog(f"DALI webdataset shards (rank {rank})")
        # write (validated) indices where missing: DALI needs them and cannot skip a bad image
        self.table = ShardTable.build(self.shards, "pixels", self.skips.counts, index_dir, write=True,
                                      validate=validate, threads=num_threads, progress=progress and rank == 0)
        self.plan = EpochPlan(self.table, micro_batch, seed, rank)
        self.batches = 0
        self._it = self._epoch = None
        self._tmp = tempfile.mkdtemp(prefix="flowtok-dali-")
        if rank == 0:
            log.info("DALI (%s): rank 0 reads %d of %d shard(s), %d usable samples, %d micro-batches of %d per epoch",
                     "GPU %d" % device_id if device_id is not None else "CPU", len(self.shards), len(paths),
                     len(self.table), self.plan.batches_per_epoch, micro_batch)
        self.skips.maybe_log(force=True)

    @property
    def skipped(self):
        return self.skips.counts

    def _start_epoch(self) -> None:
        """A pipeline over the rest of the current epoch, from micro-batch `self.batches` on."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._it = None
        epoch, j = self.plan.locate(self.batches)
        shards, samples = self.plan.order(epoch)
        shards, samples = shards[j * self.micro_batch :], samples[j * self.micro_batch :]
        os.makedirs(self._tmp, exist_ok=True)
        for name in os.listdir(self._tmp):
            os.remove(os.path.join(self._tmp, name))
        cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(shards)]
        paths, index_paths = [], []
        for run, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):  # one run per shard: the plan is shard-major
            s = int(shards[lo])
            listed = []
            for i in samples[lo:hi].tolist():
                off, size, toff, tsize = self.table.parts[s][i].tolist()
                listed.append((self.table.key(s, i), {self.table.image_ext(s, i): (off, size), CAPTION_EXT: (toff, tsize)}))
            path = os.path.join(self._tmp, f"e{epoch}_{run:06d}.idx")
            with open(path, "w") as f:
                f.write(format_index(listed))
            paths.append(self.table.paths[s])
            index_paths.append(path)
        pipe = build_pipeline(paths, index_paths, self.micro_batch, self.resolution, self.device_id,
                              self.num_threads, self.prefetch, self.seed)
        self._it = DALIGenericIterator([pipe], ["pixels", "caption"], reader_name=READER,
                                       last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        self._epoch = epoch

    def next_batch(self) -> dict:
        if self._it is None or self._epoch != self.plan.locate(self.batches)[0]:
            self._start_epoch()
        out = next(self._it)[0]
        captions = [bytes(row).rstrip(b"\0").decode("utf-8", errors="replace").strip() for row in out["caption"].cpu().numpy()]
        entries = self.plan.entries(self.batches)
        if len(captions) != len(entries):
            raise RuntimeError(f"DALI gave {len(captions)} samples, expected {len(entries)}")
        self.batches += 1
        from flowtok_fast.models.text import tokenize

        return {
            "ids": tokenize(captions),
            "pixels": out["pixels"],
            "captions": captions,
            "keys": [self.table.key(s, i) for s, i in entries],
        }

    def next_step(self) -> list[tuple[int, dict]]:
        return [(self.rank * self.grad_accum + m, self.next_batch()) for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"samples": self.batches * self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        samples = int(state["samples"])
        if samples % self.micro_batch:
            log.warning("resumed position %d samples is not a multiple of micro_batch %d: rounding down", samples, self.micro_batch)
        self.batches = samples // self.micro_batch
        self._it = self._epoch = None

    def close(self) -> None:
        """Release the pipeline and its temporary index files (a later next_step rebuilds them)."""
        self._it = self._epoch = None
        if os.path.isdir(self._tmp):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
