"""Tokenizer training: loss goes down, exact resume from a checkpoint, export round trip,
non-finite stop, perceptual loss only from local weights."""
import logging

import pytest
import torch

from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.train import NonFiniteLossError
from flowtok_fast.train.checkpoint import list_checkpoints
from flowtok_fast.train.tokenizer_trainer import (
    TokenizerTrainConfig, TokenizerTrainer, VGGPerceptual, load_exported, load_tokenizer_config, main,
)

# 16 px, patch 4 (a 4 x 4 grid), one narrow layer per side: a step takes a few milliseconds
SMALL = dict(
    model="tiny", resolution=16, patch_size=4, encoder_width=32, encoder_layers=1, encoder_heads=2,
    decoder_width=32, decoder_layers=1, decoder_heads=2, global_batch=8, micro_batch=4, lr=3e-3,
    warmup_steps=2, ema_decay=0.9, steps=6, data_size=16, log_interval=100, ckpt_interval=1000,
    progress=False, resume="none", seed=0, perceptual_weight=0.0,
)


class Blobs:
    """A learnable toy set: flat colour images with a caption id each."""

    def __init__(self, n=16, res=16):
        g = torch.Generator().manual_seed(0)
        self.px = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, res, res).contiguous()
        self.ids = torch.zeros(n, 77, dtype=torch.long)
        self.ids[:, 0], self.ids[:, 1], self.ids[:, 2] = 49406, torch.randint(1, 400, (n,), generator=g), 49407

    def __len__(self):
        return len(self.px)

    def batch(self, idx):
        return {"pixels": self.px[idx], "ids": self.ids[idx]}


def _cfg(tmp_path, **kw):
    return TokenizerTrainConfig(**{**SMALL, "output_dir": str(tmp_path), **kw})


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.tokenizer.state_dict().items()}


def test_loss_goes_down_on_tiny_images(tmp_path):
    trainer = TokenizerTrainer(_cfg(tmp_path, steps=40), device="cpu", dataset=Blobs())
    history = trainer.train()
    assert len(history) == 40 and all(h["samples_per_s"] > 0 for h in history)
    first, last = [h["loss"] for h in history[:3]], [h["loss"] for h in history[-3:]]
    assert sum(last) < 0.5 * sum(first), [round(h["loss"], 4) for h in history]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 40
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040"]


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    straight = TokenizerTrainer(_cfg(tmp_path / "a"), device="cpu", dataset=Blobs())
    losses = [h["loss"] for h in straight.train()]

    first = TokenizerTrainer(_cfg(tmp_path / "b", steps=3), device="cpu", dataset=Blobs())
    losses_b = [h["loss"] for h in first.train()]
    resumed = TokenizerTrainer(_cfg(tmp_path / "b", resume="auto"), device="cpu", dataset=Blobs())
    assert resumed.step == 3 and resumed.data.state_dict() == first.data.state_dict()
    losses_b += [h["loss"] for h in resumed.train()]

    assert losses_b == losses  # bit-identical: weights, optimizer, EMA, data position and RNG restored
    wa, wb = _weights(straight), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_export_round_trip(tmp_path):
    trainer = TokenizerTrainer(_cfg(tmp_path, steps=2), device="cpu", dataset=Blobs())
    trainer.train()
    path = trainer.export(tmp_path / "export")
    tok = load_exported(path)
    ema = trainer.ema_tokenizer()
    assert isinstance(tok, FlowTiTok) and tok.cfg == trainer.tok_cfg
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), ema.state_dict().values()))
    assert not torch.equal(ema.decoder.mask_token, trainer.tokenizer.decoder.mask_token)  # EMA, not the raw weights
    px = torch.rand(2, 3, 16, 16)
    z = tok.encode(px, sample=False)
    assert z.shape == (2, 77, 16)
    assert tok.decode(z, torch.zeros(2, 77, 64)).shape == (2, 3, 16, 16)
    decoder_only = load_exported(path, with_encoder=False)
    assert not decoder_only.has_encoder


def test_non_finite_loss_stops_before_the_weights_change(tmp_path):
    trainer = TokenizerTrainer(_cfg(tmp_path), device="cpu", dataset=Blobs())
    with torch.no_grad():
        trainer.tokenizer.decoder.conv_out.bias.fill_(float("nan"))
    before = _weights(trainer)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1: loss=nan, l1=nan, l2=nan, kl=\d"):
        trainer.train()
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert trainer.step == 0 and not list_checkpoints(tmp_path)


def test_perceptual_loss_only_from_local_weights(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flowtok_fast.train.tokenizer_trainer"):
        off = TokenizerTrainer(_cfg(tmp_path / "off", perceptual_weight=0.5), device="cpu", dataset=Blobs())
    assert off.objective.perceptual is None and off.objective.weights["perceptual"] == 0.0
    assert "perceptual loss off" in caplog.text

    from torchvision.models import vgg16

    torch.manual_seed(0)
    feats = vgg16(weights=None).features[: VGGPerceptual.LAYERS[-1] + 1]
    path = tmp_path / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    on = TokenizerTrainer(_cfg(tmp_path / "on", perceptual_weight=0.5, perceptual_weights=str(path)), device="cpu", dataset=Blobs())
    net = on.objective.perceptual
    assert net is not None and "perceptual" not in dict(on.objective.named_modules())  # frozen, not checkpointed
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert net(x, x).item() == pytest.approx(0.0, abs=1e-6) and net(x, y).item() > 0
    row = on.train_step()
    assert row["perceptual"] > 0 and not any(p.requires_grad for p in net.parameters())


def test_config_overrides_and_errors(tmp_path):
    cfg = load_tokenizer_config(None, ["steps=5", "resume=none", "betas=[0.9, 0.95]", "clip_weights=null"], resolution=32)
    assert cfg.steps == 5 and cfg.resume == "none" and cfg.betas == (0.9, 0.95) and cfg.tokenizer_config().resolution == 32
    with pytest.raises(ValueError, match="unknown config key"):
        load_tokenizer_config(None, ["nope=1"])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TokenizerTrainConfig(resolution=30, patch_size=4)
    with pytest.raises(ValueError, match="needs clip_weights"):
        TokenizerTrainer(TokenizerTrainConfig(model="published", output_dir=str(tmp_path)), device="cpu")


def test_cli_trains_and_exports(tmp_path):
    args = [f"{k}={v}" for k, v in {**SMALL, "steps": 2, "output_dir": tmp_path}.items()]
    assert main(args) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "export" / "config.json").is_file()
    load_exported(tmp_path / "export")


@pytest.mark.parametrize("item, message", [
    ("steps=0", "steps=0: expected an integer >= 1"),
    ("encoder_heads=0", "encoder_heads=0: expected an integer >= 1"),
    ("encoder_heads=3", "encoder_width=.*encoder_heads=3: expected heads dividing"),
    ("lr=inf", "lr=inf: expected a finite number > 0"),
    ("text_drop_prob=2", "text_drop_prob=2.0: expected a number in"),
    ("global_batch=6", "global_batch=6: expected a multiple of micro_batch=4"),
])
def test_config_values_are_range_checked(item, message):
    from flowtok_fast.errors import UserError

    with pytest.raises(UserError, match=message):
        load_tokenizer_config(None, [f"{k}={v}" for k, v in SMALL.items() if k != "model"] + [item])


def test_missing_weight_files_are_named(tmp_path):
    from flowtok_fast.errors import UserError

    for key in ("perceptual_weights", "init_weights", "clip_weights"):
        with pytest.raises(UserError, match=f"{key}={tmp_path / 'gone.bin'}: file not found"):
            TokenizerTrainer(_cfg(tmp_path, perceptual_weight=0.1, **{key: str(tmp_path / "gone.bin")}), device="cpu", dataset=Blobs())
