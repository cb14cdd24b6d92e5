from pathlib import Path

import pytest

from flowtok_fast.errors import UserError
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
    with pytest.raises(UserError, match="global_batch=10: expected a multiple of micro_batch=4"):
        TrainConfig(global_batch=10, micro_batch=4)
    with pytest.raises(UserError, match="not a multiple of micro_batch"):
        TrainConfig(global_batch=8, micro_batch=4).grad_accum(3)
    with pytest.raises(UserError, match="training config not found: no/such.yaml"):
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
    with pytest.raises(UserError, match="generator_width=100, generator_heads=3: .*heads"):
        load_config(None, ["generator_width=100", "generator_heads=3"])


@pytest.mark.parametrize("item, message", [
    ("steps=0", "steps=0: expected an integer >= 1"),
    ("global_batch=-8", "global_batch=-8: expected an integer >= 1"),
    ("micro_batch=0", "micro_batch=0: expected an integer >= 1"),
    ("log_interval=0", "log_interval=0: expected an integer >= 1"),
    ("data_size=0", "data_size=0: expected an integer >= 1"),
    ("warmup_steps=-1", "warmup_steps=-1: expected an integer >= 0"),
    ("seed=-3", "seed=-3: expected an integer >= 0"),
    ("lr=nan", "lr=nan: expected a finite number > 0"),
    ("lr=0", "lr=0.0: expected a finite number > 0"),
    ("ema_decay=1", "ema_decay=1.0: expected a number in \\[0, 1\\)"),
    ("cfg_prob=1.5", "cfg_prob=1.5: expected a number in \\[0, 1\\]"),
    ("kl_weight=-1", "kl_weight=-1.0: expected a finite number >= 0"),
    ("t_logit_scale=0", "t_logit_scale=0.0: expected a finite number > 0"),
    ("betas=[0.9, 1.5]", "betas=\\[0.9, 1.5\\]: expected two numbers in \\[0, 1\\)"),
    ("generator_heads=0", "generator_heads=0: expected an integer >= 1"),
    ("recompute=some", "recompute='some': expected one of"),
])
def test_out_of_range_values_name_the_key(item, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(CONFIGS / "tiny.yaml", [item])
    assert "\n" not in str(info.value)


def test_bad_yaml_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(UserError, match=f"{bad}: not valid YAML at line"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping of config keys"):
        load_config(bad)
    bad.write_text("steps: abc\n")
    with pytest.raises(UserError, match=f"{bad}: steps='abc': expected int"):
        load_config(bad)
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match=f"{bad}: cannot read"):
        load_config(bad)
