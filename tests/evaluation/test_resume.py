"""Kill generation (SIGTERM, SIGKILL), rerun: finished shards are reused, the final set equals an
uninterrupted run's, and nothing half-written is ever read."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flowtok_fast.evaluation import shards as sh
from tests.evaluation.cheap_images import PROMPTS, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def image_set(folder, fmt):
    return [np.asarray(im) for s in sh.plan_shards(len(PROMPTS), 3) for im in sh.read_shard(str(folder), s, fmt)]


@pytest.mark.parametrize("fmt,sig", [("png", signal.SIGTERM), ("tar", signal.SIGKILL)])
def test_killed_run_resumes_to_the_same_set(tmp_path, fmt, sig):
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    run(str(reference), fmt)
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tests.evaluation.cheap_images", str(killed), fmt, "0.4"], cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not sh.is_done(str(killed), sh.Shard(1, 3, 6), fmt):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    finished = {n for n in os.listdir(killed) if sh.TMP_MARK not in n and n.startswith("shard-")}
    assert 2 <= len(finished) < 4, finished
    mtimes = {n: os.stat(killed / n).st_mtime_ns for n in finished}

    sh.remove_stale_temporaries(str(killed))  # what the t2i command does before generating
    calls = []
    stats = run(str(killed), fmt, calls=calls)
    assert stats["shards_reused"] == len(finished)
    done_images = {i for n in finished for i in range(int(n[6:11]) * 3, int(n[6:11]) * 3 + 3)}
    assert not done_images & set(c - 7 * 1_000_003 for c in calls)  # no finished image made again
    assert all(os.stat(killed / n).st_mtime_ns == t for n, t in mtimes.items())
    assert not [n for n in os.listdir(killed) if sh.TMP_MARK in n]
    for a, b in zip(image_set(reference, fmt), image_set(killed, fmt), strict=True):
        np.testing.assert_array_equal(a, b)


def test_half_written_shard_is_never_read(tmp_path):
    shard = sh.Shard(0, 0, 3)
    half = tmp_path / (shard.name("png") + sh.TMP_MARK + "999")
    half.mkdir()
    (half / "000000.png").write_bytes(b"truncated")
    assert not sh.is_done(str(tmp_path), shard, "png")
    calls = []
    run(str(tmp_path), "png", calls=calls)
    assert len(calls) == len(PROMPTS)  # shard 0 generated, not taken from the temporary
    assert sh.remove_stale_temporaries(str(tmp_path)) == [half.name]


def test_seeds_depend_only_on_the_global_index():
    assert [sh.image_seed(7, i) for i in range(3)] == [7 * 1_000_003, 7 * 1_000_003 + 1, 7 * 1_000_003 + 2]
    plan = sh.plan_shards(10, 4)
    assert [(s.start, s.stop) for s in plan] == [(0, 4), (4, 8), (8, 10)]
    slices = [sh.rank_slice(plan, r, 2) for r in range(2)]
    assert sorted(s.index for part in slices for s in part) == [0, 1, 2] and not set(slices[0]) & set(slices[1])
