import signal
from pathlib import Path

import pytest
import torch

from flowtok_fast import ops
from flowtok_fast.errors import UserError
from flowtok_fast.train import NonFiniteLossError, Trainer, TrainConfig, load_config
from flowtok_fast.train.checkpoint import list_checkpoints

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}


def test_tiny_config_loss_goes_down(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"output_dir={tmp_path}", "steps=20", "progress=false", "ckpt_interval=5"])
    history = Trainer(cfg, device="cpu").train()
    assert len(history) == 20 and all(h["samples_per_s"] > 0 for h in history)
    for term, factor in (("loss", 0.7), ("flow", 0.95)):
        values = [h[term] for h in history]
        assert sum(values[-3:]) < factor * sum(values[:3]), (term, values)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 20
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000015", "step_00000020"]  # keep_checkpoints=2


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, tiny_run):
    straight = Trainer(TrainConfig(**{**tiny_run, "steps": 6, "output_dir": str(tmp_path / "a")}), device="cpu")
    losses = [h["loss"] for h in straight.train()]

    first = Trainer(TrainConfig(**{**tiny_run, "steps": 3, "output_dir": str(tmp_path / "b")}), device="cpu")
    losses_b = [h["loss"] for h in first.train()]
    resumed = Trainer(TrainConfig(**{**tiny_run, "steps": 6, "output_dir": str(tmp_path / "b"), "resume": "auto"}), device="cpu")
    assert resumed.step == 3 and resumed.data.state_dict() == first.data.state_dict()
    losses_b += [h["loss"] for h in resumed.train()]

    assert losses_b == losses  # bit-identical
    wa, wb = _weights(straight), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not any(torch.equal(ea[k], wa[f"generator.{k}"]) for k in ["blocks.0.adaLN_modulation.1.weight"])
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_non_finite_loss_stops_with_every_term(tmp_path, tiny_run):
    trainer = Trainer(TrainConfig(**{**tiny_run, "output_dir": str(tmp_path)}), device="cpu")
    with torch.no_grad():
        trainer.objective.generator.final_layer.linear.bias.fill_(float("nan"))
    before = _weights(trainer)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1: loss=nan, flow=nan, align=\d\S*, kl=\d"):
        trainer.train()
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert trainer.step == 0 and not list_checkpoints(tmp_path)


def test_sigterm_saves_and_returns(tmp_path, tiny_run):
    trainer = Trainer(TrainConfig(**{**tiny_run, "steps": 10, "output_dir": str(tmp_path)}), device="cpu")
    next_step, calls = trainer.data.next_step, []

    def next_step_then_sigterm():
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # arrives during step 2
        return next_step()

    trainer.data.next_step = next_step_then_sigterm
    previous = signal.getsignal(signal.SIGTERM)
    history = trainer.train()
    assert len(history) == 2 and trainer.step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("policy", [{"activation_checkpointing": True}, {"recompute": "attn"}, {"recompute": "qkv"}])
def test_recomputation_gives_the_same_steps(tmp_path, tiny_run, policy):
    runs = []
    for extra in ({}, policy):
        t = Trainer(TrainConfig(**{**tiny_run, "steps": 2, **extra, "output_dir": str(tmp_path / str(len(runs)))}), device="cpu")
        runs.append(([h["loss"] for h in t.train()], _weights(t)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for k in runs[0][1]:
        torch.testing.assert_close(runs[0][1][k], runs[1][1][k])


def test_compile_and_fused_flags_are_applied_around_the_model(tmp_path, tiny_run):
    # Applying only: compiling on CPU needs a C++ toolchain and minutes; the Triton kernels run
    # on CUDA (or the slow interpreter). Both are exercised by the GPU checks.
    t = Trainer(TrainConfig(**{**tiny_run, "compile_blocks": True, "fused_kernels": True, "output_dir": str(tmp_path)}), device="cpu")
    gen = t.objective.generator
    assert all(b._compiled_call_impl is not None for b in gen.blocks)
    assert ops.impl_of(gen) == "triton"
    assert gen.t2t_temperature.shape == (1,)


def test_config_errors(tmp_path, tiny_run):
    with pytest.raises(ValueError, match="needs clip_weights"):
        Trainer(TrainConfig(**{**tiny_run, "model": "B", "output_dir": str(tmp_path)}), device="cpu")
    with pytest.raises(UserError, match="launch with torchrun"):
        Trainer(TrainConfig(**{**tiny_run, "parallelism": "ddp", "output_dir": str(tmp_path)}), device="cpu")
    with pytest.raises(UserError, match="clip_weights=.*gone.pt: file not found"):
        Trainer(TrainConfig(**{**tiny_run, "clip_weights": str(tmp_path / "gone.pt"), "output_dir": str(tmp_path)}), device="cpu")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="output_dir=.*a_file: a file, expected a directory"):
        Trainer(TrainConfig(**{**tiny_run, "output_dir": str(tmp_path / "a_file")}), device="cpu")
    with pytest.raises(UserError, match="nope is not a complete training checkpoint: it does not exist"):
        Trainer(TrainConfig(**{**tiny_run, "resume": str(tmp_path / "nope"), "output_dir": str(tmp_path)}), device="cpu")


@pytest.mark.parametrize("overrides", [
    {"data_kind": "pixels"},  # through the frozen tokenizer encoder
    {"direction": "i2t"},
    {"precision": "bf16", "kl_form": "per_sample"},  # autocast path (CPU bf16)
])
def test_variants_run(tmp_path, tiny_run, overrides):
    t = Trainer(TrainConfig(**{**tiny_run, "steps": 1, "output_dir": str(tmp_path), **overrides}), device="cpu")
    row = t.train()[0]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "flow", "align", "kl"))
    if overrides.get("direction") == "i2t":
        # alignment and KL weights 0; the text decoder's cross-entropy over a 49408-word vocabulary
        assert row["loss"] == pytest.approx(row["flow"] + row["text_dec"], rel=1e-6)
        assert row["text_dec"] > 5.0
        assert t.objective.text_decoder is not None
    else:
        assert row["text_dec"] == 0.0


def test_i2t_text_decoder_learns_the_captions(tmp_path, tiny_run):
    """Joint i2t training: the decoder's cross-entropy falls, and it is checkpointed with the model."""
    t = Trainer(TrainConfig(**{**tiny_run, "direction": "i2t", "steps": 12, "lr": 3e-3, "warmup_steps": 0,
                               "output_dir": str(tmp_path)}), device="cpu")
    rows = t.train()
    assert rows[-1]["text_dec"] < 0.5 * rows[0]["text_dec"]
    assert any(k.startswith("text_decoder.") for k in t.objective.state_dict())


def test_text_captions_are_tokenized(tmp_path, tiny_run):
    pytest.importorskip("open_clip")
    from flowtok_fast.models.text import tokenize

    t = Trainer(TrainConfig(**{**tiny_run, "output_dir": str(tmp_path)}), device="cpu")
    captions = ["a red bicycle by a lake", "a cat"]
    moments = torch.randn(2, 32, 1, 77)
    torch.manual_seed(0)
    feats_text, z_text = t.frozen({"text": captions, "moments": moments}, t.device)
    torch.manual_seed(0)
    feats_ids, z_ids = t.frozen({"ids": tokenize(captions), "moments": moments}, t.device)
    assert torch.equal(feats_text, feats_ids) and torch.equal(z_text, z_ids)


def test_ema_copies_into_a_plain_generator(tmp_path, tiny_run):
    from flowtok_fast.configs import TINY
    from flowtok_fast.models.generator import FlowTokGenerator

    t = Trainer(TrainConfig(**{**tiny_run, "steps": 2, "output_dir": str(tmp_path)}), device="cpu")
    t.train()
    fresh = FlowTokGenerator(TINY.generator, TINY.text_vae)
    t.ema.copy_to(fresh)
    assert fresh.t2t_temperature.shape == ()  # the published shape, trained as [1]
    ema = t.ema.state_dict()
    assert torch.equal(fresh.t2t_temperature.reshape(1), ema["t2t_temperature"])
    assert torch.equal(fresh.blocks[1].mlp.fc2.weight, ema["blocks.1.mlp.fc2.weight"])
