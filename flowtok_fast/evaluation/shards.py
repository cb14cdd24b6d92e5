"""Shards on disk: image i lives in shard i // shard_size. A shard is written whole under a
temporary name and renamed into place (os.replace), so a shard that exists is complete and a
killed run leaves at most a temporary, which the next run deletes. Two layouts: a PNG folder
(`shard-00003/000123.png`) or an uncompressed tar of the same files (`shard-00003.tar`)."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass

from PIL import Image

from flowtok_fast.errors import UserError

FORMATS = ("png", "tar")
TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first global image index
    stop: int  # one past the last

    def name(self, fmt: str) -> str:
        return f"shard-{self.index:05d}" + (".tar" if fmt == "tar" else "")


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    return [Shard(i, s, min(s + shard_size, num_images)) for i, s in enumerate(range(0, num_images, shard_size))]


def rank_slice(shards: list[Shard], rank: int, world: int) -> list[Shard]:
    """Disjoint across ranks, together all of them: rank r takes shards r, r + world, ..."""
    return shards[rank::world]


def image_seed(base_seed: int, index: int) -> int:
    """Each image's noise seed depends only on the run's seed and the image's global index."""
    return base_seed * 1_000_003 + index


def shard_path(folder: str, shard: Shard, fmt: str) -> str:
    return os.path.join(folder, shard.name(fmt))


def is_done(folder: str, shard: Shard, fmt: str) -> bool:
    return os.path.exists(shard_path(folder, shard, fmt))


def remove_stale_temporaries(folder: str) -> list[str]:
    """What a killed run left half-written: never read, deleted before generating again."""
    stale = [n for n in os.listdir(folder) if TMP_MARK in n]
    for name in stale:
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return stale


def write_shard(folder: str, shard: Shard, fmt: str, images: list[Image.Image]) -> str:
    """All of the shard's images at once, atomically. Returns the final path."""
    if len(images) != shard.stop - shard.start:
        raise ValueError(f"shard {shard.index} needs {shard.stop - shard.start} images, got {len(images)}")
    final = shard_path(folder, shard, fmt)
    tmp = f"{final}{TMP_MARK}{os.getpid()}"
    if fmt == "png":
        os.makedirs(tmp)
        for i, im in zip(range(shard.start, shard.stop), images):
            im.save(os.path.join(tmp, f"{i:06d}.png"))
    else:
        with tarfile.open(tmp, "w") as tar:
            for i, im in zip(range(shard.start, shard.stop), images):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                info = tarfile.TarInfo(f"{i:06d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    os.replace(tmp, final)
    return final


def read_shard(folder: str, shard: Shard, fmt: str) -> list[Image.Image]:
    """The shard's images in index order (RGB, loaded); a UserError if it is not what was planned."""
    path = shard_path(folder, shard, fmt)
    names = [f"{i:06d}.png" for i in range(shard.start, shard.stop)]
    try:
        if fmt == "png":
            return [_load(open(os.path.join(path, n), "rb").read()) for n in names]
        with tarfile.open(path) as tar:
            return [_load(tar.extractfile(n).read()) for n in names]
    except (OSError, KeyError, tarfile.TarError) as err:
        raise UserError(f"{path}: shard is not the one this run planned ({err}): "
                        "a different --shard-size or --num-images? use a fresh --out") from None


def _load(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")
