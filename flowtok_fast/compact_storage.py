"""Smaller model directories: weights stored in half precision, and only the vocabulary rows a
small-vocabulary model can use.

A model trained on a closed vocabulary (the captioned-shapes example: ~20 CLIP token ids) still
carries two 49408-row tables: CLIP's token embedding and the text decoder's output head. Those are
97% of its bytes. `compact` keeps their rows for `vocab_rows` only; `expand` puts them back at
load with a stated fill (embedding and head weight 0, head bias -1e4), so a loaded model is the
full-size module again and nothing downstream knows. What changes is stated too:
- the text decoder's head: a dropped id must already be unreachable (bias <= -1e4, which is how
  the example restricts it), otherwise `compact` refuses: the outputs would change;
- CLIP's embedding: a prompt word outside the rows reads a zero vector. The pipeline warns when a
  prompt uses such a word (`vocabulary_of`), since the model never saw it anyway.

Half precision: floating parameters are stored as bf16 or fp16 and loaded back into the fp32 modules
(as fp32); buffers and integer tensors are kept as they are.
"""
from __future__ import annotations

import json

import torch

from flowtok_fast.errors import UserError

META_KEY = "storage"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# table key -> value of a dropped row after loading
VOCAB_TABLES = {"clip.token_embedding.weight": 0.0, "text_decoder.head.weight": 0.0, "text_decoder.head.bias": -1e4}
UNREACHABLE_BIAS = -1e4


def compact(tensors: dict[str, torch.Tensor], dtype: str = "float32",
            vocab_rows: torch.Tensor | list[int] | None = None,
            keep_fp32: set[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict]:
    """(smaller tensors, the `storage` metadata `expand` needs). `keep_fp32`: names stored as they
    are (buffers: fixed tables such as RoPE and pos_embed, checked against a recomputation at load,
    and the latent normalisation)."""
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"storage dtype {dtype!r}: expected one of {list(STORAGE_DTYPES)}")
    out = dict(tensors)
    meta: dict = {"dtype": dtype}
    if vocab_rows is not None:
        rows = torch.as_tensor(vocab_rows, dtype=torch.long).unique()
        tables = {k: fill for k, fill in VOCAB_TABLES.items() if k in out}
        if not tables:
            raise UserError(f"vocab_rows given but the weights hold none of the vocabulary tables {list(VOCAB_TABLES)}")
        size = {out[k].shape[0] for k in tables}
        if len(size) != 1 or int(rows.max()) >= next(iter(size)) or int(rows.min()) < 0:
            raise UserError(f"vocab_rows must be ids in [0, {min(size)}) of tables with one vocabulary size, got "
                            f"ids {int(rows.min())}..{int(rows.max())} for table sizes {sorted(size)}")
        size = next(iter(size))
        if "text_decoder.head.bias" in out:
            dropped = torch.ones(size, dtype=torch.bool)
            dropped[rows] = False
            reachable = out["text_decoder.head.bias"][dropped] > UNREACHABLE_BIAS
            if reachable.any():
                raise UserError(f"the text decoder can emit {int(reachable.sum())} token id(s) outside vocab_rows "
                                f"(head bias above {UNREACHABLE_BIAS:g}): dropping them would change its captions")
        for k in tables:
            out[k] = out[k][rows]
        meta["vocab"] = {"size": size, "rows": rows.tolist(), "fill": tables}
    store = STORAGE_DTYPES[dtype]
    out = {k: (v.to(store) if v.is_floating_point() and k not in keep_fp32 else v).contiguous() for k, v in out.items()}
    return out, meta


def expand(tensors: dict[str, torch.Tensor], meta: dict | None, source: str) -> dict[str, torch.Tensor]:
    """The full-size fp32 state dict back from `compact`'s output (unchanged when `meta` is None)."""
    if not meta:
        return tensors
    if meta.get("dtype") not in STORAGE_DTYPES:
        raise UserError(f"{source}: storage dtype {meta.get('dtype')!r} is not one of {list(STORAGE_DTYPES)}")
    out = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    vocab = meta.get("vocab")
    if vocab:
        rows = torch.tensor(vocab["rows"], dtype=torch.long)
        for k, fill in vocab["fill"].items():
            if k not in out or out[k].shape[0] != len(rows):
                found = tuple(out[k].shape) if k in out else "missing"
                raise UserError(f"{source}: '{k}' should hold the {len(rows)} stored vocabulary rows, found {found}")
            full = torch.full((vocab["size"], *out[k].shape[1:]), float(fill), dtype=out[k].dtype)
            full[rows] = out[k]
            out[k] = full
    return out


def read_meta(metadata: dict | None) -> dict | None:
    """The `storage` entry of a safetensors header's metadata, parsed (None if absent)."""
    if not metadata or META_KEY not in metadata:
        return None
    return json.loads(metadata[META_KEY])


def vocabulary_of(meta: dict | None) -> frozenset[int] | None:
    """The token ids a compacted model knows (None: every id)."""
    vocab = (meta or {}).get("vocab")
    return frozenset(vocab["rows"]) if vocab else None
