"""Two gloo ranks (set up as torchrun would) produce the same image set as one process, each
rank writing a disjoint slice of the shards. torch.multiprocessing instead of torchrun: the same
environment variables and process group, without torchrun's launcher startup on a loaded CI box."""
import os
import socket

import numpy as np
import torch.multiprocessing as mp

from flowtok_fast.evaluation import shards as sh
from tests.evaluation.cheap_images import PROMPTS, distributed_worker, run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_the_same_set_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    run(str(one))
    # fork: the children need not import torch again (no process group exists in the parent)
    mp.start_processes(distributed_worker, args=(2, free_port(), str(two), str(tmp_path / "made")), nprocs=2,
                       join=True, start_method="fork")
    made = [{int(i) for i in (tmp_path / f"made.{r}").read_text().split()} for r in range(2)]
    assert made[0] == {0, 1, 2, 6, 7, 8} and made[1] == {3, 4, 5, 9, 10, 11}  # shards 0, 2 and 1, 3
    plan = sh.plan_shards(len(PROMPTS), 3)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == [s.name("png") for s in plan]
    for shard in plan:
        for a, b in zip(sh.read_shard(str(one), shard, "png"), sh.read_shard(str(two), shard, "png"), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rank_slices_are_disjoint_and_complete():
    plan = sh.plan_shards(len(PROMPTS), 3)
    parts = [sh.rank_slice(plan, r, 3) for r in range(3)]
    assert sorted(s.index for p in parts for s in p) == [s.index for s in plan]
    assert sum(len(p) for p in parts) == len(plan)
