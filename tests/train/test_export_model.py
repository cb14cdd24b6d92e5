"""export-model: a tiny trained t2i and i2t run -> model directories that FlowTokPipeline and
FlowTokCaptioner load and run, holding the checkpoint's weights (raw or EMA)."""
import json

import pytest
import torch

from flowtok_fast.captioning import FlowTokCaptioner
from flowtok_fast.configs import TINY
from flowtok_fast.errors import UserError
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.pipeline import FlowTokPipeline
from flowtok_fast.train import Trainer, TrainConfig
from flowtok_fast.train.checkpoint import list_checkpoints
from flowtok_fast.train.export_model import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per direction (i2t through the frozen image encoder), 2 steps each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: see conftest._one_thread
    root = tmp_path_factory.mktemp("export")
    base = dict(model="tiny", global_batch=4, micro_batch=4, lr=1e-3, warmup_steps=1, ema_decay=0.5, steps=2,
                data_size=8, log_interval=100, ckpt_interval=1000, progress=False, resume="none", seed=3)
    out = {}
    for direction, extra in (("t2i", {}), ("i2t", {"data_kind": "pixels"})):
        cfg = TrainConfig(**base, direction=direction, output_dir=str(root / direction), **extra)
        trainer = Trainer(cfg, device="cpu")
        trainer.train()
        out[direction] = (trainer, list_checkpoints(root / direction)[-1])
    torch.set_num_threads(threads)
    return out


def _expected_generator(trainer, ema: bool) -> dict:
    gen = FlowTokGenerator(TINY.generator, TINY.text_vae)
    sd = {k: v.reshape(gen.state_dict()[k].shape) for k, v in trainer.objective.generator.state_dict().items()}
    gen.load_state_dict(sd)
    if ema:
        trainer.ema.copy_to(gen)
    return gen.state_dict()


def _assert_same(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for k in expected:
        assert torch.equal(actual[k].cpu(), expected[k]), k


@pytest.mark.parametrize("ema", [False, True])
def test_t2i_export_generates(runs, tmp_path, capsys, ema):
    trainer, ckpt = runs["t2i"]
    assert main([str(ckpt), "--out", str(tmp_path / "model"), *(["--ema"] if ema else [])]) == 0
    assert f"flowtok-fast generate --prompt \"...\" --model-dir {tmp_path / 'model'}" in capsys.readouterr().out
    pipe = FlowTokPipeline.from_pretrained(str(tmp_path / "model"), device="cpu")
    _assert_same(pipe.generator.state_dict(), _expected_generator(trainer, ema))
    _assert_same(pipe.clip.state_dict(), trainer.frozen.clip.state_dict())  # the tower it trained with
    if ema:  # the average differs from the raw weights after 2 steps at decay 0.5
        raw = _expected_generator(trainer, False)
        assert not torch.equal(pipe.generator.state_dict()["final_layer.linear.weight"], raw["final_layer.linear.weight"])
    (image,) = pipe(["a red square"], steps=2, seed=0)
    assert image.size == (TINY.tokenizer.resolution,) * 2
    assert json.loads((tmp_path / "model" / "training.json").read_text())["step"] == 2


@pytest.mark.parametrize("ema", [False, True])
def test_i2t_export_captions(runs, tmp_path, ema):
    trainer, ckpt = runs["i2t"]
    # a run's output_dir works too: its newest checkpoint
    assert main([str(ckpt.parent.parent), "--out", str(tmp_path / "model"), *(["--ema"] if ema else [])]) == 0
    cap = FlowTokCaptioner.from_pretrained(str(tmp_path / "model"), device="cpu")
    _assert_same(cap.generator.state_dict(), _expected_generator(trainer, ema))
    _assert_same(cap.text_decoder.state_dict(), trainer.objective.text_decoder.state_dict())
    enc = {k: v for k, v in cap.tokenizer.state_dict().items() if k == "latent_tokens" or k.startswith("encoder.")}
    _assert_same(enc, trainer.frozen.image.state_dict())  # the image encoder it trained with
    (caption,) = cap(torch.rand(1, 3, 64, 64), steps=2)
    assert isinstance(caption, str)


def test_export_replaces_a_model_dir_and_refuses_other_outs(runs, tmp_path):
    _, ckpt = runs["t2i"]
    out = tmp_path / "model"
    main([str(ckpt), "--out", str(out)])
    with pytest.raises(UserError, match="pass --force"):
        main([str(ckpt), "--out", str(out), "--ema"])
    main([str(ckpt), "--out", str(out), "--ema", "--force"])  # over a previous export
    assert json.loads((out / "training.json").read_text())["ema"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for bad, message in ((tmp_path / "file", "is a file"), (tmp_path / "busy", "is not a model directory")):
        with pytest.raises(UserError, match=message):
            main([str(ckpt), "--out", str(bad)])
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_export_errors_name_the_problem(runs, tmp_path):
    _, ckpt = runs["t2i"]
    with pytest.raises(UserError, match="holds no checkpoint"):
        main([str(tmp_path), "--out", str(tmp_path / "m")])
    with pytest.raises(UserError, match="does not exist"):
        main([str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    copy = tmp_path / "step_00000002"
    copy.mkdir()
    for f in ckpt.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt / "train_config.json").read_text())
    for change, message in (
        ({"tokenizer_weights": str(tmp_path / "gone.bin")}, f"names tokenizer_weights={tmp_path / 'gone.bin'}, which is not a file: pass --tokenizer FILE"),
        ({"clip_weights": str(tmp_path / "gone.pt")}, "names clip_weights=.*gone.pt, which is not a file: pass --clip FILE"),
        ({"direction": "x2y"}, "unknown direction 'x2y'"),
        ({"model": "XL"}, "names no clip_weights \\(model XL\\): pass --clip FILE"),
    ):
        (copy / "train_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message) as info:
            main([str(copy), "--out", str(tmp_path / "m")])
        assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


def test_tokenizer_file_given_on_the_command_line(runs, tmp_path):
    from flowtok_fast.models.tokenizer import FlowTiTok
    from flowtok_fast.train.tokenizer_trainer import export_tokenizer

    _, ckpt = runs["t2i"]
    torch.manual_seed(7)
    tok = FlowTiTok(TINY.tokenizer)
    export_tokenizer(tok, tmp_path / "tok")
    main([str(ckpt), "--out", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok" / "model.safetensors")])
    pipe = FlowTokPipeline.from_pretrained(str(tmp_path / "model"), device="cpu")
    expected = {k: v for k, v in tok.state_dict().items() if k.startswith(("decoder.", "latent_norm."))}
    _assert_same(pipe.tokenizer.state_dict(), expected)
    with pytest.raises(UserError, match="--tokenizer .*gone.bin is not a file"):
        main([str(ckpt), "--out", str(tmp_path / "m2"), "--tokenizer", str(tmp_path / "gone.bin")])
