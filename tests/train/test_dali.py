"""The DALI path against the PyTorch path on the same shards: DALI's CPU pipeline (device_id=None)
runs here; the GPU (mixed, nvJPEG) pipeline needs a CUDA device and is skipped without one."""
import tarfile

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from flowtok_fast.train import Trainer, TrainConfig  # noqa: E402
from flowtok_fast.train.dali_pipeline import DaliSource  # noqa: E402
from flowtok_fast.train.webdata import index_path, main as index_main, read_index, write_shard  # noqa: E402

from .test_webdata import good_sample, image_bytes, make_shards, source  # noqa: E402


def dali(spec, **kw):
    args = dict(global_batch=4, micro_batch=4, resolution=32, num_threads=1, seed=0, progress=False)
    args.update(kw)
    return DaliSource(spec, **args)


def mixed_shards(root):
    """jpg and png of many sizes: odd and even crop margins, portrait and landscape, up- and
    down-scaling to 32 px."""
    sizes = [(30, 47), (47, 30), (33, 33), (20, 27), (41, 64), (64, 41), (35, 52), (52, 37), (28, 29), (90, 31)]
    for s in range(2):
        samples = []
        for i, (h, w) in enumerate(sizes):
            fmt = "PNG" if (i + s) % 4 == 0 else "JPEG"
            samples.append({"__key__": f"k{s}_{i}", "png" if fmt == "PNG" else "jpg": image_bytes(h + s, w, 7 * i + s, fmt),
                            "txt": f"image {s} {i}"})
        write_shard(root / f"m{s}.tar", samples)


def compare(a, b, batches: int) -> float:
    worst = 0.0
    for _ in range(batches):
        x, y = a.next_batch(), b.next_batch()
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"] and torch.equal(x["ids"], y["ids"])
        assert y["pixels"].shape == x["pixels"].shape and y["pixels"].dtype == torch.float32
        diff = (x["pixels"] - y["pixels"].cpu()).abs()
        worst = max(worst, diff.max().item())
        assert diff.mean().item() < 1.5 / 255
    return worst


def test_dali_cpu_gives_the_pytorch_paths_batches(tmp_path):
    mixed_shards(tmp_path)  # 20 samples -> 5 micro-batches of 4 per epoch
    worst = compare(source(str(tmp_path)), dali(str(tmp_path)), 12)  # two epoch boundaries
    assert worst <= 2.5 / 255  # same libjpeg-turbo decode; PIL and DALI bicubic round differently by 1-2 levels
    # resume mid-epoch: the temporary index starts at the right sample
    straight = dali(str(tmp_path), micro_batch=3, global_batch=3)
    keys = [straight.next_batch()["keys"] for _ in range(9)]
    resumed = dali(str(tmp_path), micro_batch=3, global_batch=3)
    resumed.load_state_dict({"samples": 12})
    assert [resumed.next_batch()["keys"] for _ in range(5)] == keys[4:]
    resumed.close()


def test_dali_ranks_read_their_shard_slices(tmp_path):
    make_shards(tmp_path, 4, 3)
    for r in range(2):
        d, w = dali(str(tmp_path), rank=r, world_size=2, micro_batch=2), source(str(tmp_path), rank=r, world_size=2, micro_batch=2)
        assert d.grad_accum == 1 and d.shards == w.shards
        (i, batch), = d.next_step()
        assert i == r and all(k[1] in (str(r), str(r + 2)) for k in batch["keys"])
        assert batch["keys"] == w.next_batch()["keys"]


def test_dali_skips_bad_samples_through_validated_indices(tmp_path):
    jpg = image_bytes(32, 40, 5)
    write_shard(tmp_path / "a.tar", [good_sample(f"a{i}", i) for i in range(3)] + [
        {"__key__": "a_corrupt", "jpg": jpg[: len(jpg) // 2], "txt": "truncated"},
        {"__key__": "a_no_txt", "jpg": jpg},
    ])
    write_shard(tmp_path / "b.tar", [good_sample("b0", 7)])
    (tmp_path / "c.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "d.tar", "w"):
        pass
    idx_dir = tmp_path / "idx"
    d = dali(str(tmp_path), micro_batch=2, global_batch=2, index_dir=str(idx_dir))
    assert d.skipped == {"corrupt": 1, "missing_caption": 1, "empty_shard": 2}
    assert [k for k, _ in read_index(index_path(str(tmp_path / "a.tar"), str(idx_dir)))] == ["a0", "a1", "a2"]
    seen = [k for _ in range(4) for k in d.next_batch()["keys"]]  # two epochs of 2 micro-batches: no error
    assert sorted(seen) == sorted(["a0", "a1", "a2", "b0"] * 2)
    # the written indices are reused (nothing to count again), and the PyTorch path reads them too
    again = dali(str(tmp_path), micro_batch=2, global_batch=2, index_dir=str(idx_dir))
    assert again.skipped == {"empty_shard": 2}
    assert source(str(tmp_path), micro_batch=2, global_batch=2, index_dir=str(idx_dir)).next_batch()["keys"] == \
        dali(str(tmp_path), micro_batch=2, global_batch=2, index_dir=str(idx_dir)).next_batch()["keys"]


def test_index_tool_writes_indices_beside_the_shards(tmp_path, capsys):
    write_shard(tmp_path / "a.tar", [good_sample("a0", 1), {"__key__": "bad", "jpg": b"\xff\xd8\xff", "txt": "x"}])
    assert index_main([str(tmp_path)]) == 0
    assert [k for k, _ in read_index(str(tmp_path / "a.idx"))] == ["a0"]
    assert "corrupt" in capsys.readouterr().out


def test_trainer_runs_on_dali_cpu(tmp_path, tiny_run):
    make_shards(tmp_path / "data", 2, 4)
    cfg = TrainConfig(**{**tiny_run, "data_source": "dali", "data_kind": "pixels", "data_path": str(tmp_path / "data"),
                         "data_workers": 1, "global_batch": 4, "micro_batch": 2, "steps": 2, "output_dir": str(tmp_path / "out")})
    trainer = Trainer(cfg, device="cpu")
    history = trainer.train()
    assert isinstance(trainer.data, DaliSource) and len(history) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history) and trainer.data.state_dict() == {"samples": 8}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: DALI's mixed (nvJPEG) decoder and GPU resize")
def test_dali_gpu_matches_the_pytorch_path(tmp_path):
    mixed_shards(tmp_path)
    gpu = dali(str(tmp_path), device_id=torch.cuda.current_device())
    batch = gpu.next_batch()
    assert batch["pixels"].is_cuda and batch["pixels"].shape == (4, 3, 32, 32)
    gpu = dali(str(tmp_path), device_id=torch.cuda.current_device())
    worst = compare(source(str(tmp_path)), gpu, 6)
    assert worst <= 12 / 255  # nvJPEG's IDCT differs from libjpeg-turbo's by a few levels
