"""pretokenize: images -> fp16 posterior moments shards, read back by data_source=pretokenized."""
import os
import tarfile

import numpy as np
import pytest
import torch

from flowtok_fast import checkpoint
from flowtok_fast.configs import TINY
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.train import Trainer, TrainConfig
from flowtok_fast.train import pretokenize as pt
from flowtok_fast.train.transforms import load_pixels
from flowtok_fast.train.webdata import MOMENTS_EXT, WebDatasetSource, decode_moments, scan_tar, write_shard

from .test_webdata import good_sample, image_bytes


@pytest.fixture
def tokenizer_file(tmp_path):
    torch.manual_seed(0)
    tok = FlowTiTok(TINY.tokenizer).eval()
    path = tmp_path / "tiny_titok.bin"
    torch.save(tok.state_dict(), path)
    return tok, str(path)


def input_shards(root):
    originals = {}
    for s in range(2):
        samples = [good_sample(f"p{s}_{i}", 5 * s + i) for i in range(4)]
        if s == 1:
            jpg = image_bytes(40, 50, 3)
            samples += [{"__key__": "p1_corrupt", "jpg": jpg[:200], "txt": "cut short"},
                        {"__key__": "p1_no_txt", "png": image_bytes(40, 50, 4, "PNG")}]
        write_shard(root / f"in-{s}.tar", samples)
        originals.update({x["__key__"]: x for x in samples})
    (root / "in-2.tar").write_bytes(b"")  # an empty shard
    return originals


def read_shard(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_round_trip_matches_direct_encoding(tmp_path, tokenizer_file, capsys):
    tok, weights = tokenizer_file
    originals = input_shards(tmp_path / "in")
    out = tmp_path / "out"
    rc = pt.main([str(tmp_path / "in"), "--out", str(out), "--tokenizer", weights, "--config", "tiny",
                  "--batch-size", "3", "--workers", "0", "--no-progress"])
    assert rc == 0 and sorted(os.listdir(out)) == ["in-0.tar", "in-1.tar"]  # no temporary files, no empty output
    printed = capsys.readouterr().out
    assert "2 shard(s) written" in printed and "corrupt': 1" in printed and "missing_caption': 1" in printed
    got = {**read_shard(out / "in-0.tar"), **read_shard(out / "in-1.tar")}
    assert sorted(got) == sorted(k for k in originals if k.startswith("p") and "_c" not in k and "_n" not in k)
    for key, sample in got.items():
        assert set(sample) == {MOMENTS_EXT, "txt"} and sample["txt"].decode() == originals[key]["txt"]
        # the reference reads token.npy as np.frombuffer(x, dtype=np.float16) -> reshape(32, 1, 77)
        ref = np.frombuffer(sample[MOMENTS_EXT], dtype=np.float16).reshape(32, 1, 77)
        image = originals[key].get("jpg", originals[key].get("png"))
        with torch.no_grad():
            direct = tok.encoder(load_pixels(image, 64)[None], tok.latent_tokens)[0]
        assert torch.equal(decode_moments(sample[MOMENTS_EXT]), torch.from_numpy(ref.copy()))
        torch.testing.assert_close(torch.from_numpy(ref.astype(np.float32)), direct, atol=2e-3, rtol=2e-3)
    # read back through the training source: fp16 moments [B, 32, 1, 77] and CLIP ids
    src = WebDatasetSource(str(out), "moments", global_batch=2, micro_batch=2, num_workers=0, progress=False)
    batch = src.next_batch()
    assert batch["moments"].dtype == torch.float16 and batch["moments"].shape == (2, 32, 1, 77)
    for key, m in zip(batch["keys"], batch["moments"]):
        assert m.numpy().tobytes() == got[key][MOMENTS_EXT]


def test_rerun_skips_finished_shards_and_writes_atomically(tmp_path, tokenizer_file, monkeypatch):
    _, weights = tokenizer_file
    input_shards(tmp_path / "in")
    encoder = pt.load_encoder(weights, config="tiny")
    stats = pt.pretokenize(str(tmp_path / "in"), str(tmp_path / "out"), encoder, batch_size=4, workers=0, progress=False)
    assert (stats["shards_written"], stats["shards_existing"], stats["samples"]) == (2, 0, 8)
    assert stats["skipped"] == {"corrupt": 1, "missing_caption": 1, "empty_shard": 1}
    before = {p: os.stat(tmp_path / "out" / p).st_mtime_ns for p in ("in-0.tar", "in-1.tar")}
    again = pt.pretokenize(str(tmp_path / "in"), str(tmp_path / "out"), encoder, workers=0, progress=False)
    assert (again["shards_written"], again["shards_existing"]) == (0, 2)
    assert before == {p: os.stat(tmp_path / "out" / p).st_mtime_ns for p in before}
    # a crash while writing leaves neither a partial shard nor a temporary file
    os.remove(tmp_path / "out" / "in-1.tar")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    real = checkpoint._atomic_write
    monkeypatch.setattr(checkpoint, "_atomic_write", lambda path, write: real(path, broken))
    with pytest.raises(OSError, match="disk full"):
        pt.pretokenize(str(tmp_path / "in"), str(tmp_path / "out"), encoder, workers=0, progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["in-0.tar"]
    monkeypatch.undo()
    # two processes split the shards r::w
    parts = [pt.pretokenize(str(tmp_path / "in"), str(tmp_path / f"split{r}"), encoder, workers=0, progress=False,
                            rank=r, world_size=2) for r in range(2)]
    assert sorted(os.listdir(tmp_path / "split0")) == ["in-0.tar"] and sorted(os.listdir(tmp_path / "split1")) == ["in-1.tar"]
    assert parts[1]["skipped"]["corrupt"] == 1


def test_trainer_runs_on_pretokenized_shards(tmp_path, tokenizer_file, tiny_run):
    _, weights = tokenizer_file
    input_shards(tmp_path / "in")
    pt.pretokenize(str(tmp_path / "in"), str(tmp_path / "tok"), pt.load_encoder(weights, config="tiny"), workers=0, progress=False)
    samples, _ = scan_tar(str(tmp_path / "tok" / "in-0.tar"))
    assert len(samples) == 4 and set(samples[0][1]) == {MOMENTS_EXT, "txt"}
    run = {**tiny_run, "data_source": "pretokenized", "data_path": str(tmp_path / "tok"), "data_workers": 0,
           "global_batch": 4, "micro_batch": 2, "steps": 3}
    straight = Trainer(TrainConfig(**{**run, "output_dir": str(tmp_path / "a")}), device="cpu")
    losses = [h["loss"] for h in straight.train()]
    assert straight.frozen.image is None  # no image encoder at train time
    first = Trainer(TrainConfig(**{**run, "steps": 2, "output_dir": str(tmp_path / "b")}), device="cpu")
    losses_b = [h["loss"] for h in first.train()]
    resumed = Trainer(TrainConfig(**{**run, "output_dir": str(tmp_path / "b"), "resume": "auto"}), device="cpu")
    losses_b += [h["loss"] for h in resumed.train()]
    assert losses_b == losses  # 8 samples = 2 steps per epoch: the resumed step is in epoch 1


def test_output_is_readable_by_the_webdataset_library(tmp_path, tokenizer_file):
    wds = pytest.importorskip("webdataset")
    _, weights = tokenizer_file
    input_shards(tmp_path / "in")
    pt.pretokenize(str(tmp_path / "in"), str(tmp_path / "tok"), pt.load_encoder(weights, config="tiny"), workers=0, progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "tok" / "in-0.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"p0_{i}" for i in range(4)]
    assert all(len(s[MOMENTS_EXT]) == 2 * 32 * 77 and s["txt"].startswith(b"a photo") for s in samples)


def test_load_encoder_checks_its_input(tmp_path, tokenizer_file):
    _, weights = tokenizer_file
    with pytest.raises(Exception, match="RoPE table|missing|unexpected|shape"):
        pt.load_encoder(weights, config="published")  # tiny weights into the published sizes
    torch.save({"decoder.x": torch.zeros(1)}, tmp_path / "dec.bin")
    with pytest.raises(Exception, match="no FlowTiTok encoder weights"):
        pt.load_encoder(str(tmp_path / "dec.bin"))
    assert pt.load_encoder(None, config="tiny").cfg.resolution == 64
    with pytest.raises(SystemExit):
        pt.main([str(tmp_path), "--out", str(tmp_path / "o")])  # no weights given
