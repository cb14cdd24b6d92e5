"""The example's config: YAML + `section.key=value` overrides, checked for every stage before the
first one runs, so that a misspelt key or a bad value is a UserError naming it (and the known keys
or the expected value) instead of a failure minutes into the run. The tokenizer, t2i and i2t
sections are the package trainers' own configs, checked by building them as the stages do; the
other sections belong to the example and are listed here."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import yaml

from flowtok_fast.errors import UserError


def _int(low: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError
        return v
    return f"an integer >= {low}", check


def _number(what: str, ok=lambda x: True):
    def check(v):
        x = float(v)  # YAML reads '1e-3' (no dot) as a string
        if isinstance(v, bool) or not math.isfinite(x) or not ok(x):
            raise ValueError
        return x
    return what, check


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError
    return v


def _scales(v):
    return [_number("")[1](x) for x in v]


def _backgrounds(v):
    from examples.shapes.data import BACKGROUNDS

    if not v or any(b not in BACKGROUNDS for b in v):
        raise ValueError
    return list(v)


def _combos(v):
    from examples.shapes.data import all_combos

    if any(tuple(c) not in all_combos() for c in v):
        raise ValueError
    return [list(c) for c in v]


# the example's own sections: key -> (what is expected, check returning the value to use)
SECTIONS = {
    "data": {"train_size": _int(1), "eval_size": _int(1), "per_shard": _int(1),
             "jitter": _number("a number >= 0", lambda x: x >= 0),
             "new_fraction": _number("a number in (0, 1)", lambda x: 0 < x < 1),
             "backgrounds": ("a non-empty list of: black, grey", _backgrounds),
             "held_out_combos": ("a list of [colour, shape] pairs of the grammar", _combos)},
    "sample": {"prompts": _int(1), "steps": _int(1), "cfg_scale": _number("a finite number"),
               "compare_cfg_scales": ("a list of finite numbers", _scales)},
    "text_autoencoder": {"steps": _int(1), "batch": _int(1), "lr": _number("a number > 0", lambda x: x > 0),
                         "kl_weight": _number("a number >= 0", lambda x: x >= 0), "freeze_for_t2i": ("true or false", _bool)},
    "caption": {"images": _int(1), "steps": _int(1), "cfg_scale": _number("a finite number"),
                "compare_cfg_scales": ("a list of finite numbers", _scales), "meteor": ("true or false", _bool)},
}
OPTIONAL = {"data": ("jitter",), "sample": ("compare_cfg_scales",), "caption": ("compare_cfg_scales", "meteor"),
            "text_autoencoder": ("freeze_for_t2i",)}


def _directions(v):
    if not v or any(d not in ("t2i", "i2t") for d in v):
        raise ValueError
    return list(v)


TOP_LEVEL = {"seed": _int(0), "resolution": _int(8), "threads": _int(1),
             "directions": ("a non-empty list of: t2i, i2t", _directions)}
TRAINER_SECTIONS = ("tokenizer", "t2i", "i2t")  # the package trainers' configs
# keys the example sets itself in the trainer sections (a value given there would be ignored)
FORCED = {"tokenizer": ("model", "resolution", "output_dir", "seed"),
          "t2i": ("model", "direction", "data_kind", "output_dir", "seed", "tokenizer_weights"),
          "i2t": ("model", "direction", "data_kind", "output_dir", "seed", "tokenizer_weights", "text_decoder")}


def load_config(path: str | Path, overrides: list[str] = (), directions: list[str] | None = None) -> dict:
    """YAML, then `section.key=value` overrides (values parsed as YAML), then `validate` for the
    directions to run (default: the config's)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path}: file not found (expected a YAML file like examples/shapes/configs/default.yaml)")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config {path}: expected a mapping of sections, got {type(cfg).__name__}")
    given = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(key.split(".")):
            raise UserError(f"override '{item}': expected section.key=value (e.g. t2i.steps=100)")
        node = cfg
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{'.'.join(parents[:i + 1])}' is a value, not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"override '{item}': the value is not valid YAML ({' '.join(str(err).split())})") from None
        given[key] = item
    validate(cfg, path, given, directions)
    return cfg


# the sections each direction's stages read (data, tokenizer and text autoencoder run for both)
NEEDED = {"t2i": ("t2i", "sample"), "i2t": ("i2t", "caption")}


def validate(cfg: dict, path="config", given: dict[str, str] | None = None, directions: list[str] | None = None) -> None:
    """Every stage's keys and values, before any runs; normalises the example's own values in place
    (e.g. '1e-3' -> 0.001). A UserError names the key, where it came from (the override as typed,
    or the config file) and the known keys or the expected value."""
    given = given or {}

    def where(key: str) -> str:
        return f"override '{given[key]}'" if key in given else f"config {path}: {key}"

    def check(name: str, node: dict, key: str, spec) -> None:
        what, convert = spec
        try:
            node[key] = convert(node[key])
        except (TypeError, ValueError):
            raise UserError(f"{where(name)}: got {node[key]!r}, expected {what}") from None

    known = [*TOP_LEVEL, *SECTIONS, *TRAINER_SECTIONS]
    for key in list(cfg):
        if key not in known:
            raise UserError(f"{where(key)}: unknown key '{key}' (expected one of: {', '.join(known)})")
        if key in TOP_LEVEL:
            check(key, cfg, key, TOP_LEVEL[key])
    for key in ("seed", "resolution"):
        if key not in cfg:
            raise UserError(f"config {path}: no '{key}' (expected {TOP_LEVEL[key][0]})")
    directions = directions or cfg.get("directions") or ["t2i", "i2t"]
    optional = {s for d, sections in NEEDED.items() if d not in directions for s in sections}
    for section in [*SECTIONS, *TRAINER_SECTIONS]:
        values = cfg.get(section)
        if values is None and section in optional:
            continue  # a direction that does not run; a section given for it is still checked
        if not isinstance(values, dict):
            found = "missing" if values is None else f"{values!r}"
            raise UserError(f"{where(section)}: section '{section}' is {found}, expected a mapping of keys")
        if section in SECTIONS:
            spec = SECTIONS[section]
            for key in values:
                if key not in spec:
                    raise UserError(f"{where(f'{section}.{key}')}: unknown key '{key}' in section '{section}' "
                                    f"(expected one of: {', '.join(spec)})")
                check(f"{section}.{key}", values, key, spec[key])
            missing = [k for k in spec if k not in values and k not in OPTIONAL.get(section, ())]
            if missing:
                raise UserError(f"config {path}: section '{section}' has no {', '.join(missing)}")
            continue
        fields = [f.name for f in dataclasses.fields(_trainer_class(section))]
        for key in values:
            if key not in fields or key in FORCED[section]:
                why = "is set by the example" if key in fields else "unknown key"
                raise UserError(f"{where(f'{section}.{key}')}: {why} '{key}' in section '{section}' "
                                f"(expected one of: {', '.join(k for k in fields if k not in FORCED[section])})")
        try:
            built = (tokenizer_train_config(values, cfg, "unused") if section == "tokenizer"
                     else train_config(values, "unused", cfg["seed"], section, "unused"))
        except (TypeError, ValueError) as err:  # UserError is a ValueError
            names = [f"override '{given[f'{section}.{k}']}'" for k in values if f"{section}.{k}" in given]
            raise UserError(f"section '{section}' ({'; '.join(names) or f'config {path}'}): {err}") from None
        if built.global_batch > cfg["data"]["train_size"]:
            raise UserError(f"{where(f'{section}.global_batch')}: global_batch={built.global_batch} exceeds "
                            f"data.train_size={cfg['data']['train_size']} (one batch must fit in the training set)")


def _trainer_class(section: str):
    from flowtok_fast.train import TrainConfig
    from flowtok_fast.train.tokenizer_trainer import TokenizerTrainConfig

    return TokenizerTrainConfig if section == "tokenizer" else TrainConfig


def tokenizer_train_config(section: dict, cfg: dict, output_dir):
    """The tokenizer trainer's config for the example (tiny model, the example's resolution and seed)."""
    from flowtok_fast.train.tokenizer_trainer import load_tokenizer_config

    return load_tokenizer_config(None, [], **{**section, "model": "tiny", "resolution": cfg["resolution"],
                                              "output_dir": str(output_dir), "seed": cfg["seed"]})


def train_config(section: dict, out_dir, seed: int, direction: str, tokenizer_weights):
    """A generator trainer's config for one direction, on the pretokenised moments."""
    from flowtok_fast.train import load_config as load_train_config

    values = {"resume": "none", **section, "model": "tiny", "direction": direction, "data_kind": "moments",
              "output_dir": str(out_dir), "seed": seed, "tokenizer_weights": str(tokenizer_weights)}
    if direction == "i2t":
        # the text decoder is trained (on the grammar's vocabulary) with the text VAE before, and
        # both stay frozen; the trainer's joint 49408-way decoder is far too slow on CPU
        values["text_decoder"] = False
    # through the trainer's own key=value parsing: types coerced ('1e-4' is a string to YAML), unknown keys refused
    return load_train_config(None, [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in values.items()])
