"""Checkpoints: the official files <-> our models, and our own safetensors directories.

Official: `FlowTok-{XL,H}.pth` (generator + text VAE + alignment MLP), `FlowTiTok_{256,512}.bin`
(image tokenizer), OpenAI CLIP ViT-L/14-336 (`.pt` archive) or open_clip (`.bin`/`.safetensors`).
Ours: a directory with `config.json` + `model.safetensors`, keys prefixed by component
(`generator.`, `tokenizer.`, `clip.`). Every write is a temp file + rename.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from flowtok_fast.errors import UserError
from flowtok_fast.configs import GENERATORS, TINY, FlowTokConfig, GeneratorConfig, TokenizerConfig, get_config
from flowtok_fast.models.embeddings import sincos_1d
from flowtok_fast.models.latent_norm import LatentNorm
from flowtok_fast.models.rope import rope_2d_tables

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
COMPONENTS = ("generator", "tokenizer", "clip", "text_decoder")


class CheckpointError(UserError):
    pass


# ---------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors, a torch pickle (weights_only) or a TorchScript
    archive (OpenAI CLIP `.pt`); common wrappers ('model', 'state_dict', 'module.') removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an OpenAI .pt is a TorchScript archive, not a pickle
            try:
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception:
                raise CheckpointError(f"cannot read {path}: {_torch_load_reason(path, err)}; expected a .safetensors "
                                      "file, a torch state dict of tensors or a TorchScript archive") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """safetensors' load_file, its errors ('header too large', ...) naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}): truncated or not safetensors?") from None


def _torch_load_reason(path: Path, err: Exception) -> str:
    """Why torch.load failed, in our words: torch's advice to retry with weights_only=False (which
    would run whatever code the pickle names) is never passed on."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if "weights_only" in str(err):
        return ("it holds pickled Python objects other than tensors, which are never unpickled here "
                "(they could run code)")
    first = str(err).split(". ")[0].strip() or type(err).__name__
    return first if isinstance(err, RuntimeError) else f"{type(err).__name__}: {first}"


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), but the error lists every missing key, unexpected key and
    shape mismatch at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{what} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)


def _check_fixed(name: str, stored: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    """Fixed tables (pos_embed, RoPE) are recomputed and compared, not trusted blindly."""
    err = (stored.float() - expected.float()).abs().max().item()
    if err > atol:
        raise CheckpointError(f"{what}: '{name}' differs from the recomputed table by {err:.2e} (> {atol})")


# ---------------------------------------------------------------- official layouts


def generator_config_from_state_dict(sd: dict[str, torch.Tensor]) -> GeneratorConfig:
    if "pos_embed" not in sd:
        raise CheckpointError("not a FlowTok generator checkpoint: missing key 'pos_embed'")
    width = sd["pos_embed"].shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    name = _generator_name(width, depth)
    if name is None:
        raise CheckpointError(f"no known generator size has width {width} and depth {depth} (known: {dict(GENERATORS)})")
    return _KNOWN_GENERATORS[name]


_KNOWN_GENERATORS = {**GENERATORS, "tiny": TINY.generator}


def _generator_name(width: int, depth: int) -> str | None:
    return next((n for n, c in _KNOWN_GENERATORS.items() if (c.width, c.depth) == (width, depth)), None)


def clean_generator_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # training checkpoints may carry a frozen CLIP under open_clip* keys: unused here
    return {k: v for k, v in sd.items() if not k.startswith("open_clip")}


def check_generator_tables(sd: dict[str, torch.Tensor], what: str) -> None:
    pos = sd["pos_embed"]
    _check_fixed("pos_embed", pos, sincos_1d(pos.shape[1], pos.shape[2])[None], what)


def tokenizer_resolution_from_state_dict(sd: dict[str, torch.Tensor], patch_size: int = 16) -> int:
    key = "decoder.positional_embedding.freqs_cos"
    if key not in sd:
        raise CheckpointError(f"not a FlowTiTok checkpoint: missing key '{key}'")
    grid = math.isqrt(sd[key].shape[0])
    if grid * grid != sd[key].shape[0]:
        raise CheckpointError(f"'{key}' has {sd[key].shape[0]} rows, not a square grid")
    return grid * patch_size


def check_tokenizer_tables(sd: dict[str, torch.Tensor], cfg: TokenizerConfig, what: str) -> None:
    for side, width, heads in (("encoder", cfg.encoder_width, cfg.encoder_heads), ("decoder", cfg.decoder_width, cfg.decoder_heads)):
        prefix = f"{side}.positional_embedding."
        if prefix + "freqs_cos" not in sd:
            continue
        cos, sin = rope_2d_tables(cfg.grid, width // heads)
        stored = sd[prefix + "freqs_cos"]
        if stored.shape != cos.shape:
            res = tokenizer_resolution_from_state_dict({"decoder.positional_embedding.freqs_cos": stored}, cfg.patch_size)
            raise CheckpointError(
                f"{what} is a {res} px tokenizer (RoPE table {tuple(stored.shape)}) but the model is built "
                f"for {cfg.resolution} px (table {tuple(cos.shape)})"
            )
        _check_fixed(prefix + "freqs_cos", stored, cos, what)
        _check_fixed(prefix + "freqs_sin", sd[prefix + "freqs_sin"], sin, what)


CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


def clean_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the text tower only (drop visual.*, text_projection, logit_scale, attn_mask...)."""
    if any(k.startswith("text.") for k in sd):  # open_clip CustomTextCLIP layout
        sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    return {k: v for k, v in sd.items() if k.startswith(CLIP_TEXT_PREFIXES)}


def load_generator(model: nn.Module, path: str | os.PathLike) -> None:
    sd = clean_generator_state_dict(read_state_dict(path))
    check_generator_tables(sd, str(path))
    load_strict(model, sd, f"generator checkpoint {path}")


def tokenizer_state_dict(sd: dict[str, torch.Tensor], with_encoder: bool = True) -> dict[str, torch.Tensor]:
    """The keys a FlowTiTok loads (decoder and latent_norm only when built without the encoder).
    The published files carry no `latent_norm.*`: the reference's values (shift 0, scale 1.0143)
    are filled in for whichever is missing."""
    if not with_encoder:
        sd = {k: v for k, v in sd.items() if k.startswith(("decoder.", "latent_norm."))}
    return {**LatentNorm.reference_state_dict("latent_norm."), **sd}


def load_tokenizer(model: nn.Module, path: str | os.PathLike) -> None:
    sd = tokenizer_state_dict(read_state_dict(path), model.has_encoder)
    check_tokenizer_tables(sd, model.cfg, f"tokenizer checkpoint {path}")
    load_strict(model, sd, f"tokenizer checkpoint {path}")


def load_clip(model: nn.Module, path: str | os.PathLike) -> None:
    load_strict(model, clean_clip_state_dict(read_state_dict(path)), f"CLIP checkpoint {path}")


def config_from_official(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike) -> FlowTokConfig:
    gen_cfg = generator_config_from_state_dict(clean_generator_state_dict(read_state_dict(checkpoint)))
    name = _generator_name(gen_cfg.width, gen_cfg.depth)
    return get_config(name, tokenizer_resolution_from_state_dict(read_state_dict(tokenizer)))


# ---------------------------------------------------------------- our directory format


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: a model directory is readable as any file the user writes
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(directory: str | os.PathLike, config: FlowTokConfig, components: dict[str, nn.Module],
                    storage_dtype: str = "float32", vocab_rows=None, sampling: dict | None = None) -> Path:
    """Write config.json + model.safetensors. Weights go first; config.json, written last, marks
    the directory complete, so an interrupted save never looks like a valid model.
    storage_dtype ("bfloat16", "float16") and vocab_rows (the token ids a closed-vocabulary model
    uses) make the file smaller: flowtok_fast/compact_storage.py; loading undoes both."""
    from safetensors.torch import save_file

    from flowtok_fast import compact_storage

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in components.items():
        if name not in COMPONENTS:
            raise ValueError(f"unknown component '{name}': expected some of {COMPONENTS}")
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    # the config travels with the weights too: an edited config.json is caught on load
    meta = {"format": "flowtok-fast", "components": ",".join(components), "config": json.dumps(config.to_dict())}
    if storage_dtype != "float32" or vocab_rows is not None:
        buffers = {f"{name}.{k}" for name, module in components.items() for k, _ in module.named_buffers()}
        tensors, storage = compact_storage.compact(tensors, storage_dtype, vocab_rows, keep_fp32=buffers)
        meta[compact_storage.META_KEY] = json.dumps(storage)
    cfg_path = directory / CONFIG_FILE
    if cfg_path.exists():
        cfg_path.unlink()  # the directory is incomplete until the new config lands
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    payload = {"config": config.to_dict(), "components": list(components)}
    if sampling:  # how the model wants to be sampled (flowtok_fast/sampling.py Recipe)
        payload["sampling"] = sampling
    _atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))
    return directory


def read_pretrained(directory: str | os.PathLike) -> tuple[FlowTokConfig, dict[str, dict[str, torch.Tensor]]]:
    """config.json + model.safetensors -> (config, {component: state dict}), every problem named:
    invalid JSON, a missing section, unknown keys, bad values, and a config that does not fit the
    weights (the config saved inside model.safetensors, and the generator's shapes)."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{directory} is not a flowtok-fast model directory: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(make one with `flowtok-fast convert` or `flowtok-fast export-model`)"
        )
    from flowtok_fast import compact_storage

    payload = _read_config_json(cfg_path)
    config = FlowTokConfig.from_dict(payload["config"], source=f"{cfg_path} 'config'")
    metadata = _header_metadata(weights)
    saved = _saved_config(metadata, weights)
    if saved is not None:
        _check_same_config(config, saved, cfg_path, weights)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in payload["components"]}
    tensors = compact_storage.expand(load_safetensors(weights), storage_meta(directory, metadata), str(weights))
    for k, v in tensors.items():
        name, _, rest = k.partition(".")
        if name not in parts:
            raise CheckpointError(f"{weights}: key '{k}' belongs to no listed component {list(parts)}")
        parts[name][rest] = v
    if "generator" in parts:
        _check_generator_shape(config, parts["generator"], cfg_path)
    return config, parts


def _read_config_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path.name} in {path.parent} is not valid JSON: line {err.lineno} column {err.colno}: "
                              f"{err.msg}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path.name} in {path.parent} is not UTF-8 text (a binary file?)") from None
    expected = '{"config": {...}, "components": [...]} as save_pretrained writes it'
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected an object {expected}, got {type(payload).__name__}")
    for key in ("config", "components"):
        if key not in payload:
            raise CheckpointError(f"{path} has no '{key}' section: expected {expected}")
    unknown = sorted(set(payload) - {"config", "components", "sampling"})
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {unknown}: expected {expected}")
    comps = payload["components"]
    if not isinstance(comps, list) or not comps or any(c not in COMPONENTS for c in comps):
        raise CheckpointError(f"{path}: 'components' must be a non-empty list of {list(COMPONENTS)}, got {comps!r}")
    return payload


def read_sampling(directory: str | os.PathLike) -> dict | None:
    """config.json's 'sampling' section (checked by sampling.Recipe.from_dict), None if absent."""
    return _read_config_json(Path(directory) / CONFIG_FILE).get("sampling")


def read_components(directory: str | os.PathLike) -> list[str]:
    """The components config.json lists (generator, tokenizer, clip / text_decoder), checked."""
    return _read_config_json(Path(directory) / CONFIG_FILE)["components"]


def _header_metadata(weights: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err}): truncated or not safetensors?") from None


def storage_meta(directory: str | os.PathLike, metadata: dict | None = None) -> dict | None:
    """How a model directory's weights are stored (compact_storage.compact's record), None if plainly."""
    from flowtok_fast import compact_storage

    weights = Path(directory) / WEIGHTS_FILE
    try:
        return compact_storage.read_meta(_header_metadata(weights) if metadata is None else metadata)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{weights}: the 'storage' metadata is not valid JSON ({err.msg})") from None


def _saved_config(meta: dict, weights: Path) -> FlowTokConfig | None:
    if "config" not in meta:
        return None  # written before the config was stored with the weights
    try:
        return FlowTokConfig.from_dict(json.loads(meta["config"]), source=f"{weights} metadata")
    except (json.JSONDecodeError, UserError):
        return None  # the weights' own copy is damaged: the shape checks below still apply


def _check_same_config(config: FlowTokConfig, saved: FlowTokConfig, cfg_path: Path, weights: Path) -> None:
    have, want = _flat(config.to_dict()), _flat(saved.to_dict())
    changed = [f"'{k}' is {have[k]!r} but the weights were saved with {want[k]!r}"
               for k in sorted(have) if k != "name" and have[k] != want.get(k)]
    if changed:
        raise CheckpointError(f"{cfg_path} does not match {weights.name}: " + "; ".join(changed) +
                              f" (restore {CONFIG_FILE}: the weights only work with the configuration they were saved with)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_generator_shape(config: FlowTokConfig, sd: dict[str, torch.Tensor], cfg_path: Path) -> None:
    if "pos_embed" not in sd:
        return  # load_strict lists what is missing
    width = sd["pos_embed"].shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    for field, stored, ours in (("width", width, config.generator.width), ("depth", depth, config.generator.depth)):
        if stored != ours:
            raise CheckpointError(f"{cfg_path}: 'generator.{field}' is {ours} but the generator weights have {field} {stored}")
