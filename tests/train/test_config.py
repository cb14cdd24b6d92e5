from pathlib import Path

import pytest

from flowtok_fast.train.config import TrainConfig, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


@pytest.mark.parametrize("name", ["tiny", "xl_reference", "h_reference"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.03
    if name != "tiny":
        assert (cfg.global_batch, cfg.lr, cfg.ema_decay, cfg.warmup_steps) == (4096, 4e-4, 0.9999, 10000)
        assert cfg.grad_accum(world_size=8) == 2


def test_overrides_are_typed_by_field():
    cfg = load_config(CONFIGS / "tiny.yaml", ["lr=4e-4", "steps=3", "betas=[0.8, 0.9]", "compile_blocks=true",
                                               "align_weight=null", "kl_weight=1e-4", "resume=none"])
    assert cfg.lr == 4e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 3 and cfg.betas == (0.8, 0.9) and cfg.compile_blocks is True
    assert cfg.align_weight is None and cfg.kl_weight == 1e-4 and cfg.resume == "none"


@pytest.mark.parametrize(
    "item, match",
    [
        ("stepz=3", "unknown config key 'stepz'"),
        ("steps", "expected key=value"),
        ("steps=abc", "steps='abc': expected int"),
        ("steps=1.5", "expected int"),
        ("compile_blocks=maybe", "expected bool"),
        ("lr=null", "lr cannot be null"),
    ],
)
def test_bad_overrides(item, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides([item])


def test_bad_choices_and_batches():
    with pytest.raises(ValueError, match="parallelism='zero'"):
        TrainConfig(parallelism="zero")
    with pytest.raises(ValueError, match="kl_form"):
        TrainConfig(kl_form="paper")
    with pytest.raises(ValueError, match="unknown model 'XXL'"):
        TrainConfig(model="XXL")
    with pytest.raises(ValueError, match="not a multiple of micro_batch"):
        TrainConfig(global_batch=10, micro_batch=4).grad_accum(1)
    with pytest.raises(FileNotFoundError, match="training config not found"):
        load_config("no/such.yaml")


def test_loss_weights_default_by_direction():
    assert TrainConfig().loss_weights().resolved("t2i").kl == 0.01
    w = TrainConfig(direction="i2t").loss_weights().resolved("i2t")
    assert (w.align, w.kl) == (0.0, 0.0)


def test_sampling_choices_and_generator_shape_override():
    cfg = load_config(None, ["t_sampling=uniform", "latent_sampling=mean", "generator_depth=3", "generator_width=64",
                             "generator_heads=4", "t_logit_loc=-1.5"])
    assert (cfg.t_sampling, cfg.latent_sampling, cfg.t_logit_loc, cfg.t_logit_scale) == ("uniform", "mean", -1.5, 1.0)
    model = cfg.model_config()
    assert (model.generator.depth, model.generator.width, model.generator.heads) == (3, 64, 4)
    assert model.name == "tiny" and model.text_vae == load_config(None).model_config().text_vae
    assert load_config(None).model_config().generator == TrainConfig().model_config().generator  # untouched default
    for item, match in (("t_sampling=cosine", "t_sampling"), ("latent_sampling=mode", "latent_sampling")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [item])
    with pytest.raises(ValueError, match="multiple of heads"):
        load_config(None, ["generator_width=100", "generator_heads=3"])
