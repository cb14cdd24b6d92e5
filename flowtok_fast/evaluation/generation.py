"""Sharded, resumable generation. Image i gets prompt i and noise seed image_seed(seed, i), and
is generated in shard i // shard_size, batches cut inside the shard: so a rerun, another rank count
or a resumed run makes the same images. Finished shards are skipped. Writing a shard and `on_shard`
(Inception features, CLIP score) run in one background thread while the next shard is generated
(PIL and torch release the GIL): on a GPU the CPU-side PNG encoding and resizing hide behind
generation. At most one shard waits, so memory stays bounded."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from PIL import Image
from tqdm import tqdm

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation import shards as sh
from flowtok_fast.evaluation.prompts import PromptRecord

MakeImages = Callable[[list[str], list[int]], list[Image.Image]]  # (prompts, seeds) -> images
MANIFEST = "run.json"


def pipeline_images(pipeline, opts) -> MakeImages:
    """FlowTokPipeline's stages with one noise generator per image (its own seed), not one per batch."""
    import torch

    from flowtok_fast.models.text import TextVAE
    from flowtok_fast.pipeline import to_pil

    @torch.no_grad()
    def make(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        feats = pipeline.encode_text(prompts)
        with pipeline.autocast():
            mu, logvar = pipeline.generator.context_encoder(feats)
        z = torch.cat([TextVAE.sample(mu[i:i + 1], logvar[i:i + 1], pipeline.generator_rng(s))
                       for i, s in enumerate(seeds)])
        return to_pil(pipeline.decode(pipeline.flow(z, opts), feats))

    return make


def package_images(package) -> MakeImages:
    """An exported package (PackagePipeline) given each image's noise as pipeline_images draws it
    (one generator per image, [1, 77, 16] fp32): at fp32 image i is the eager path's image i."""
    import torch

    from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS

    def make(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        noise = torch.cat([torch.randn((1, NUM_TOKENS, TOKEN_CHANNELS), generator=torch.Generator(package.device).manual_seed(s),
                                       device=package.device) for s in seeds])
        return package(prompts, noise=noise)  # fewer prompts than the package batch: padded, padding dropped

    return make


def check_manifest(folder: str, settings: dict) -> None:
    """The settings that decide the images, written by the first run; a resumed run must match."""
    path = os.path.join(folder, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise UserError(f"{path}: this folder holds a run with other settings ({', '.join(diff)} differ): "
                            "use a fresh --out or the same settings to resume")
        return
    tmp = f"{path}{sh.TMP_MARK}{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def generate_shards(make_images: MakeImages, records: list[PromptRecord], folder: str, *, fmt: str = "png",
                    shard_size: int = 1000, batch_size: int = 64, seed: int = 0, rank: int = 0, world: int = 1,
                    on_shard: Callable[[sh.Shard, list[Image.Image]], None] | None = None,
                    progress: bool = True) -> dict:
    """This rank's shards of `records`, written to `folder`. Returns counts and timings."""
    plan = sh.rank_slice(sh.plan_shards(len(records), shard_size), rank, world)
    todo = [s for s in plan if not sh.is_done(folder, s, fmt)]
    reused = [s for s in plan if s not in todo]
    total = sum(s.stop - s.start for s in todo)
    timings = {"generate_seconds": 0.0, "write_seconds": 0.0, "score_seconds": 0.0}

    def finish(shard, images):  # in the background thread
        t = time.perf_counter()
        sh.write_shard(folder, shard, fmt, images)
        t2 = time.perf_counter()
        if on_shard is not None:
            on_shard(shard, images)
        timings["write_seconds"] += t2 - t
        timings["score_seconds"] += time.perf_counter() - t2

    bar = tqdm(total=total, unit="img", desc=f"generate (rank {rank})" if world > 1 else "generate",
               disable=not progress, dynamic_ncols=True)
    pending = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for shard in todo:
            images = []
            for lo in range(shard.start, shard.stop, batch_size):
                hi = min(lo + batch_size, shard.stop)
                t = time.perf_counter()
                images += make_images([r.prompt for r in records[lo:hi]], [sh.image_seed(seed, i) for i in range(lo, hi)])
                timings["generate_seconds"] += time.perf_counter() - t
                bar.update(hi - lo)
            if pending is not None:
                pending.result()  # re-raises the background thread's error, if any
            pending = pool.submit(finish, shard, images)
        if pending is not None:
            pending.result()
    bar.close()
    return {"shards_generated": len(todo), "shards_reused": len(reused), "images_generated": total, **timings}
