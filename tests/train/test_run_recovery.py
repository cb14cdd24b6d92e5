"""Training runs lose nothing: Ctrl-C saves (a second one aborts), a kill -9 leaves metrics and
checkpoints that a resumed run makes consistent, and the data's skip counts survive resumes.

The interrupted runs are `flowtok-fast train` (its main()) in a child forked from a forkserver that
has imported it once: the real entry point and signal handling, without a fresh interpreter's
imports per child, and without forking this test process (after other tests, its autograd and
compiler threads make a forked child refuse to run autograd)."""
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from flowtok_fast.train import Trainer, TrainConfig, load_config
from flowtok_fast.train.checkpoint import list_checkpoints
from flowtok_fast.train.loop import _StopSignals
from flowtok_fast.train.webdata import write_shard
from tests.train.test_webdata import good_sample, image_bytes

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"
FAST = ["steps=100000", "progress=false", "data_size=64", "log_interval=1000", "global_batch=4", "micro_batch=4"]


def _cli_child(argv: list[str], stderr_path: str) -> None:
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)  # not pytest's capture
    from flowtok_fast.train.__main__ import main

    try:
        rc = main(argv)
    except BaseException as err:  # noqa: BLE001 - report, never fall back into the test process
        os.write(2, f"child raised {type(err).__name__}: {err}\n".encode())
        rc = 99
    os._exit(rc)


_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["flowtok_fast.train.__main__", "tests.train.test_run_recovery"])


def _start(out: Path, *overrides: str):
    argv = [str(CONFIGS / "tiny.yaml"), f"output_dir={out}", *FAST, *overrides]
    child = _CONTEXT.Process(target=_cli_child, args=(argv, str(out.parent / "stderr.txt")))
    child.start()
    return child


def _rows(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _wait(child, condition, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        if not child.is_alive():
            raise AssertionError(f"training ended early with exit code {child.exitcode}")
        if time.monotonic() > end:
            child.kill()
            raise AssertionError("timed out waiting for the training child")
        time.sleep(0.02)


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    child = _start(out, "ckpt_interval=100000")
    _wait(child, lambda: len(_rows(out)) >= 3)
    os.kill(child.pid, signal.SIGINT)
    child.join(120)
    assert child.exitcode == 128 + signal.SIGINT
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Ctrl-C: saving a checkpoint" in stderr and "Traceback" not in stderr, stderr
    steps = [r["step"] for r in _rows(out)]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{steps[-1]:08d}"]
    resumed = Trainer(load_config(CONFIGS / "tiny.yaml", [f"output_dir={out}", *FAST]), device="cpu")
    assert resumed.step == steps[-1]


def test_a_second_ctrl_c_aborts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with _StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        assert signals.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_kill_9_then_resume_logs_every_step_once(tmp_path):
    out = tmp_path / "run"
    child = _start(out, "ckpt_interval=2")
    # kill at an odd step: its row is written, its checkpoint is not
    _wait(child, lambda: len(_rows(out)) >= 5 and len(_rows(out)) % 2 == 1 and list_checkpoints(out))
    child.kill()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    last = int(list_checkpoints(out)[-1].name.removeprefix("step_"))
    logged = len(_rows(out))
    assert logged >= last
    stale = out / "checkpoints" / f".step_{last + 1:08d}.tmp"  # a save the kill cut short
    stale.mkdir(exist_ok=True)
    (stale / "__0_0.distcp").write_bytes(b"partial")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "lo')  # a row the kill cut short

    resumed = Trainer(load_config(CONFIGS / "tiny.yaml", [f"output_dir={out}", *FAST[1:], f"steps={last + 2}"]), device="cpu")
    assert resumed.step == last and not stale.exists()
    resumed.train()
    assert [r["step"] for r in _rows(out)] == list(range(1, last + 3))


def test_skip_counts_are_saved_restored_and_printed(tmp_path, tiny_run, caplog):
    bad = [{"__key__": f"bad{i}", "jpg": b"not an image", "txt": "broken"} for i in range(3)]
    write_shard(tmp_path / "data" / "a.tar", [good_sample(f"a{i}", i) for i in range(6)] + bad
                + [{"__key__": "no_caption", "jpg": image_bytes(32, 32, 1)}])
    run = {**tiny_run, "data_source": "webdataset", "data_kind": "pixels", "data_path": str(tmp_path / "data"),
           "data_workers": 0, "global_batch": 3, "micro_batch": 3, "ckpt_interval": 1, "output_dir": str(tmp_path / "run")}
    caplog.set_level("INFO")
    t = Trainer(TrainConfig(**{**run, "steps": 3}), device="cpu")
    t.train()  # one epoch: the 9 listed samples, the 3 corrupt ones among them
    expected = {"corrupt": 3, "missing_caption": 1}
    assert t.data.skipped == expected
    assert "skipped in total: corrupt 3, missing_caption 1" in caplog.text
    saved = json.loads((list_checkpoints(tmp_path / "run")[-1] / "data_rank0.json").read_text())
    assert saved["skipped"]["total"] == expected
    resumed = Trainer(TrainConfig(**{**run, "steps": 4, "resume": "auto"}), device="cpu")
    assert resumed.step == 3 and resumed.data.skipped == expected  # the listing's 1 + the saved 3
