"""Webdataset shards (image + caption) through the PyTorch loader: listing, order, ranks, resume,
robustness, and the trainer hook. Shards are a few tiny images written into tmp_path."""
import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.train import Trainer, TrainConfig
from flowtok_fast.train.data import validate_batch
from flowtok_fast.train.transforms import center_offset, load_pixels, resized_size
from flowtok_fast.train.webdata import (
    BatchMaker, EpochPlan, ShardTable, WebDatasetSource, expand_braces, expand_shards, read_index, scan_tar, write_index, write_shard,
)


def image_bytes(h: int, w: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(x / 6 + seed), np.cos(y / 5 + seed), np.sin((x + y) / 9)], -1) * 0.5 + 0.5
    arr = (smooth * 200 + rng.integers(0, 55, (h, w, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def good_sample(key: str, seed: int) -> dict:
    fmt = "PNG" if seed % 3 == 0 else "JPEG"
    ext = "png" if fmt == "PNG" else "jpg"
    return {"__key__": key, ext: image_bytes(30 + 3 * (seed % 7), 44 - 2 * (seed % 5), seed, fmt), "txt": f"a photo number {key}"}


def make_shards(root, n_shards: int = 4, per_shard: int = 5) -> list[str]:
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:03d}.tar"
        write_shard(path, [good_sample(f"s{s}_{i:02d}", 10 * s + i) for i in range(per_shard)])
        paths.append(str(path))
    return paths


def source(spec, **kw):
    args = dict(kind="pixels", global_batch=4, micro_batch=4, resolution=32, num_workers=0, seed=0, progress=False)
    args.update(kw)
    return WebDatasetSource(spec, **args)


def keys_of(src, n: int) -> list[list[str]]:
    return [src.next_batch()["keys"] for _ in range(n)]


def test_shard_specs_and_index_files(tmp_path):
    paths = make_shards(tmp_path, 3, 2)
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(str(tmp_path / "shard-{000..001}.tar")) == paths[:2]
    assert expand_shards(f"{paths[2]}::{tmp_path}/shard-00[01].tar") == [paths[2], *paths[:2]]
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_shards(str(tmp_path / "nope-{0..1}.tar"))
    # our fallback for when braceexpand (a webdataset dependency) is missing
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    samples, complete = scan_tar(paths[0])
    assert complete and [k for k, _ in samples] == ["s0_00", "s0_01"]
    with tarfile.open(paths[0]) as tar:  # offsets point at the members' data
        data = tar.extractfile("s0_00.txt").read()
    off, size = samples[0][1]["txt"]
    with open(paths[0], "rb") as f:
        f.seek(off)
        assert f.read(size) == data == b"a photo number s0_00"
    idx = tmp_path / "x.idx"
    write_index(str(idx), samples)
    assert read_index(str(idx)) == samples and idx.read_text().startswith("v1.2 2\n")
    try:  # DALI's own index tool must agree with our tar scan
        from wds2idx import IndexCreator
    except ImportError:
        return
    with IndexCreator(paths[0], str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert read_index(str(tmp_path / "dali.idx")) == samples


def test_transform_is_the_reference_resize_center_crop_to_tensor():
    # the reference's ImageTransform: Resize(size, BICUBIC, antialias) -> CenterCrop -> ToTensor
    tv = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    assert resized_size(30, 47, 16) == (16, 25) and resized_size(47, 30, 16) == (25, 16)
    assert [center_offset(16 + d, 16) for d in range(6)] == [0, 0, 1, 2, 2, 2]  # round half to even
    for h, w, size in [(30, 47, 16), (47, 30, 16), (33, 33, 16), (20, 27, 40), (41, 64, 32)]:
        data = image_bytes(h, w, h * w, "PNG")
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        ref = tv.to_tensor(tv.center_crop(tv.resize(pil, size, InterpolationMode.BICUBIC, antialias=True), size))
        got = load_pixels(data, size)
        assert got.shape == (3, size, size) and torch.equal(got, ref), (h, w, size)


def test_order_is_deterministic_and_does_not_depend_on_workers(tmp_path):
    make_shards(tmp_path, 4, 5)  # 20 samples -> 5 micro-batches of 4 per epoch
    a = source(str(tmp_path))
    first = keys_of(a, 12)  # crosses two epoch boundaries
    assert a.plan.batches_per_epoch == 5 and a.epoch == 2
    epoch0 = sorted(k for b in first[:5] for k in b)
    assert epoch0 == sorted(f"s{s}_{i:02d}" for s in range(4) for i in range(5))  # every sample once
    assert sorted(k for b in first[5:10] for k in b) == epoch0 and first[5:10] != first[:5]  # reshuffled
    assert keys_of(source(str(tmp_path)), 12) == first
    assert keys_of(source(str(tmp_path), seed=1), 12) != first
    b = source(str(tmp_path), num_workers=2)  # worker k builds micro-batches k, k+2, ...: same stream
    x, y = source(str(tmp_path)), b
    for _ in range(6):
        bx, by = x.next_batch(), y.next_batch()
        assert bx["keys"] == by["keys"] and torch.equal(bx["pixels"], by["pixels"]) and torch.equal(bx["ids"], by["ids"])
        assert validate_batch(bx) == 4 and bx["pixels"].shape == (4, 3, 32, 32)
        assert bx["ids"].dtype == torch.int64 and 0 <= bx["pixels"].min() and bx["pixels"].max() <= 1
    y.close()


def test_ranks_read_their_shard_slices_and_resume_exactly(tmp_path):
    make_shards(tmp_path, 4, 5)
    ranks = [source(str(tmp_path), global_batch=8, micro_batch=2, rank=r, world_size=2) for r in range(2)]
    for r, src in enumerate(ranks):
        assert src.grad_accum == 2 and [os.path.basename(p) for p in src.shards] == [f"shard-{s:03d}.tar" for s in (r, r + 2)]
        step = src.next_step()
        assert [i for i, _ in step] == [2 * r, 2 * r + 1]
        assert all(k[1] in (str(r), str(r + 2)) for _, b in step for k in b["keys"])
    straight = source(str(tmp_path), micro_batch=2, global_batch=4)
    stream = keys_of(straight, 2 * 7)  # 10 micro-batches per epoch: crosses into epoch 1
    first = source(str(tmp_path), micro_batch=2, global_batch=4)
    first.next_step(), first.next_step(), first.next_step()
    state = first.state_dict()
    assert state == {"samples": 12}
    resumed = source(str(tmp_path), micro_batch=2, global_batch=4, num_workers=2)
    resumed.load_state_dict(state)
    assert keys_of(resumed, 8) == stream[6:]
    resumed.close()


def test_bad_samples_and_empty_shards_are_skipped_and_counted(tmp_path, caplog):
    write_shard(tmp_path / "a.tar", [good_sample(f"a{i}", i) for i in range(5)])
    jpg = image_bytes(32, 40, 99)
    write_shard(tmp_path / "b.tar", [
        good_sample("b0", 20), good_sample("b1", 21),
        {"__key__": "b_corrupt", "jpg": jpg[: len(jpg) // 3], "txt": "a truncated jpeg"},
        {"__key__": "b_garbage", "jpg": b"not an image at all", "txt": "garbage"},
        {"__key__": "b_no_txt", "jpg": jpg},
        {"__key__": "b_empty_txt", "jpg": jpg, "txt": ""},
        {"__key__": "b_no_image", "txt": "a caption alone"},
    ])
    (tmp_path / "c.tar").write_bytes(b"")  # an empty file
    with tarfile.open(tmp_path / "d.tar", "w"):  # a valid tar with no members
        pass
    (tmp_path / "e.tar").write_bytes(b"\x00garbage" * 100)  # not a tar at all
    caplog.set_level("WARNING")
    src = source(str(tmp_path), micro_batch=3, global_batch=3)
    assert src.skipped == {"missing_caption": 2, "missing_image": 1, "empty_shard": 2, "unreadable_shard": 1}
    assert len(src.table) == 9 and src.plan.batches_per_epoch == 3  # the two corrupt ones are listed
    seen = [k for b in (src.next_batch() for _ in range(3)) for k in b["keys"]]
    assert len(seen) == 9 and not {"b_corrupt", "b_garbage"} & set(seen)
    assert set(seen) == {f"a{i}" for i in range(5)} | {"b0", "b1"}  # two slots repeat a good sample
    assert src.skipped["corrupt"] == 2
    assert "skipped so far" in caplog.text and "missing_caption 2" in caplog.text
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        source(str(tmp_path), micro_batch=16, global_batch=16)


def test_a_batch_of_only_bad_samples_takes_the_next_good_one(tmp_path):
    bad = {"jpg": b"\xff\xd8 broken", "txt": "broken"}
    write_shard(tmp_path / "a.tar", [{"__key__": f"x{i}", **bad} for i in range(4)] + [good_sample("good", 3)])
    table = ShardTable.build([str(tmp_path / "a.tar")], "pixels", skipped=Counter())
    plan = EpochPlan(table, micro_batch=2, seed=0)
    maker = BatchMaker(table, plan, resolution=16)
    for n in range(2):
        batch = maker.make(n)
        assert batch["pixels"].shape == (2, 3, 16, 16) and set(batch["keys"]) <= {"good"} | {f"x{i}" for i in range(4)}
        assert "good" in batch["keys"] and not any(k.startswith("x") for k in batch["keys"])


def test_trainer_resumes_exactly_on_webdataset_shards(tmp_path, tiny_run):
    make_shards(tmp_path / "data", 2, 8)
    run = {**tiny_run, "data_source": "webdataset", "data_kind": "pixels", "data_path": str(tmp_path / "data"),
           "data_workers": 0, "global_batch": 4, "micro_batch": 2}
    straight = Trainer(TrainConfig(**{**run, "steps": 6, "output_dir": str(tmp_path / "a")}), device="cpu")
    losses = [h["loss"] for h in straight.train()]
    first = Trainer(TrainConfig(**{**run, "steps": 3, "output_dir": str(tmp_path / "b")}), device="cpu")
    losses_b = [h["loss"] for h in first.train()]
    resumed = Trainer(TrainConfig(**{**run, "steps": 6, "output_dir": str(tmp_path / "b"), "resume": "auto"}), device="cpu")
    assert resumed.step == 3 and resumed.data.state_dict() == first.data.state_dict() == {"samples": 12}
    losses_b += [h["loss"] for h in resumed.train()]
    assert losses_b == losses  # bit-identical, across an epoch boundary (4 steps per epoch)
    assert straight.data.state_dict() == {"samples": 24}


def test_config_checks_the_data_keys():
    with pytest.raises(ValueError, match="needs data_path"):
        TrainConfig(data_source="webdataset", data_kind="pixels")
    with pytest.raises(ValueError, match="set data_kind=pixels"):
        TrainConfig(data_source="dali", data_path="x")
    with pytest.raises(ValueError, match="set data_kind=moments"):
        TrainConfig(data_source="pretokenized", data_kind="pixels", data_path="x")
    with pytest.raises(ValueError, match="data_source='folder'"):
        TrainConfig(data_source="folder")
    assert TrainConfig(data_source="pretokenized", data_path="x").data_workers == 4


def test_loader_workers_survive_a_ctrl_c(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the workers must keep serving the
    batches the trainer needs to finish its step and save."""
    import signal

    from flowtok_fast.models.text import tokenize

    tokenize(["load the tokenizer here"])  # once, before the worker forks
    make_shards(tmp_path, 2, 8)
    src = source(str(tmp_path), num_workers=1, global_batch=2, micro_batch=2)
    first = src.next_batch()["keys"]
    (worker,) = src._it._workers
    os.kill(worker.pid, signal.SIGINT)
    keys = [first] + [src.next_batch()["keys"] for _ in range(5)]
    assert worker.is_alive() and len(keys) == 6
    src.close()
