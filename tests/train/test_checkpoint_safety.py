"""Training checkpoints a user can be handed: crafted pickles do not run, broken ones give one
line naming the file, and resume=auto falls back to the newest readable one."""
import dataclasses
import io
import logging
import pickle

import pytest
import torch

from flowtok_fast.errors import UserError
from flowtok_fast.train import Trainer, TrainConfig
from flowtok_fast.train import dcp_safe
from flowtok_fast.train.checkpoint import list_checkpoints


class CreatesAFile:
    """Unpickling this creates `path`: what an attacker's payload would do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _trained(tmp_path, tiny_run, steps=1, **kw):
    cfg = TrainConfig(**{**tiny_run, "steps": steps, "ckpt_interval": 1, "output_dir": str(tmp_path / "run"), **kw})
    Trainer(cfg, device="cpu").train()
    return list_checkpoints(tmp_path / "run")


def _resume(tmp_path, tiny_run, resume, steps=2):
    return Trainer(TrainConfig(**{**tiny_run, "steps": steps, "output_dir": str(tmp_path / "run"), "resume": resume}), device="cpu")


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and "weights_only" not in msg and "Traceback" not in msg, msg
    return msg


def test_crafted_metadata_is_refused_without_running(tmp_path, tiny_run):
    (ckpt,) = _trained(tmp_path, tiny_run)
    payload = pickle.dumps(CreatesAFile(tmp_path / "proof"))
    pickle.loads(payload)  # the payload works under plain pickle: the test can fail
    assert (tmp_path / "proof").exists()
    (tmp_path / "proof").unlink()

    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(CreatesAFile(marker)))
    for resume in (str(ckpt), "auto"):
        with pytest.raises(UserError) as info:
            _resume(tmp_path, tiny_run, resume)
        msg = _one_line(info.value)
        assert str(ckpt / ".metadata") in msg and "refused global" in msg
        assert not marker.exists()


def test_crafted_non_tensor_entry_is_refused(tmp_path, tiny_run):
    """The optimizer's hyper-parameters are pickled entries of the data file: DCP's own planner
    loads them with weights_only=False."""
    (ckpt,) = _trained(tmp_path, tiny_run)
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(CreatesAFile(marker), buf)
    (ckpt / "extra.distcp").write_bytes(buf.getvalue())
    metadata = dcp_safe.read_metadata(ckpt / ".metadata")
    key = next(k for k in metadata.storage_data if k.fqn == "optim.param_groups.0.lr")
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path="extra.distcp",
                                                     offset=0, length=len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))  # only DCP's own classes: passes the allow-list
    with pytest.raises(UserError) as info:
        _resume(tmp_path, tiny_run, str(ckpt))
    msg = _one_line(info.value)
    assert str(ckpt) in msg and "optim.param_groups.0.lr" in msg and "not plain data" in msg
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated data", "garbage metadata", "no metadata"])
def test_broken_checkpoint_gives_one_line(tmp_path, tiny_run, damage):
    (ckpt,) = _trained(tmp_path, tiny_run)
    if damage == "truncated data":
        data = ckpt / "__0_0.distcp"
        data.write_bytes(data.read_bytes()[:1000])
        expected = f"{data}: truncated"
    elif damage == "garbage metadata":
        (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
        expected = f"{ckpt / '.metadata'}: not a valid training checkpoint metadata file"
    else:
        (ckpt / ".metadata").unlink()
        expected = f"{ckpt} is not a complete training checkpoint"
    with pytest.raises(UserError) as info:
        _resume(tmp_path, tiny_run, str(ckpt))
    assert expected in _one_line(info.value)


def test_corrupt_data_inside_a_complete_file_is_a_clear_error(tmp_path, tiny_run):
    (ckpt,) = _trained(tmp_path, tiny_run)
    data = ckpt / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4096] = b"\xff" * 4096  # same size, damaged bytes
    data.write_bytes(bytes(raw))
    try:
        t = _resume(tmp_path, tiny_run, str(ckpt))
    except UserError as err:
        assert str(ckpt) in _one_line(err)
    else:  # the damage fell inside raw tensor bytes: loads, but must not crash
        assert t.step == 1


def test_resume_auto_falls_back_past_a_broken_checkpoint(tmp_path, tiny_run, caplog):
    older, newest = _trained(tmp_path, tiny_run, steps=2)
    (newest / "__0_0.distcp").write_bytes(b"")
    caplog.set_level(logging.WARNING)
    t = _resume(tmp_path, tiny_run, "auto", steps=3)
    assert t.step == 1
    assert f"skipping broken checkpoint {newest}" in caplog.text
    for ckpt in (older, newest):
        (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(UserError, match="no readable checkpoint") as info:
        _resume(tmp_path, tiny_run, "auto", steps=3)
    assert str(older) in _one_line(info.value) and str(newest) in str(info.value)
