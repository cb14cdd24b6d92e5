"""A deterministic stand-in for the generator in the resume and multi-process tests: image =
f(seed, prompt), optionally slow so a kill lands mid-run. What these tests check is the sharding,
not the network (test_t2i_cli.py runs the real tiny pipeline)."""
import sys
import time
import zlib

import numpy as np
from PIL import Image

from flowtok_fast.evaluation.prompts import PromptRecord

PROMPTS = [PromptRecord(f"prompt number {i}") for i in range(12)]


def make_images(prompts, seeds, delay=0.0):
    time.sleep(delay)
    return [Image.fromarray(np.random.default_rng([s, zlib.crc32(p.encode())]).integers(0, 256, (8, 8, 3), dtype=np.uint8))
            for p, s in zip(prompts, seeds)]


def run(folder, fmt="png", delay=0.0, rank=0, world=1, calls=None):
    from flowtok_fast.evaluation.generation import generate_shards

    def make(prompts, seeds):
        if calls is not None:
            calls.extend(seeds)
        return make_images(prompts, seeds, delay)

    return generate_shards(make, PROMPTS, folder, fmt=fmt, shard_size=3, batch_size=2, seed=7,
                           rank=rank, world=world, progress=False)


if __name__ == "__main__":  # python cheap_images.py FOLDER FORMAT DELAY: the run a test kills
    run(sys.argv[1], sys.argv[2], float(sys.argv[3]))


def distributed_worker(rank, world, port, folder, report):
    """One rank of a gloo group, set up the way torchrun would (environment variables)."""
    import os

    import torch

    from flowtok_fast.evaluation import distributed as dd

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dd.init(torch.device("cpu"))
    assert dd.rank_world() == (rank, world)
    calls = []
    run(folder, "png", rank=rank, world=world, calls=calls)
    with open(f"{report}.{rank}", "w") as f:  # which images this rank made
        f.write(" ".join(str(c - 7 * 1_000_003) for c in calls))
    dd.barrier()
    dd.finish()
