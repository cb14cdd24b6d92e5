"""COCO caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

METEOR and SPICE run Java (17 works). SPICE also needs Stanford CoreNLP jars that pycocoevalcap
downloads on first use; offline, SPICE is skipped with a message naming the missing files.
"""
from __future__ import annotations

import os
import shutil

from flowtok_fast.errors import UserError


class MissingJavaError(UserError, RuntimeError):
    """Java is not on PATH (a RuntimeError too, as callers that skip metrics without Java expect)."""


class MissingPackageError(UserError, ImportError):
    """pycocoevalcap is not installed."""


def predictions_by_id(data, source: str = "predictions") -> dict:
    """{id: caption}, or the list `caption --json` prints ([{"image": id, "caption": text}]) -> {id: caption}."""
    if isinstance(data, dict):
        return data
    if not isinstance(data, list):
        raise UserError(f"{source}: expected {{id: caption}} or a list of {{\"image\": ..., \"caption\": ...}}, "
                        f"got {type(data).__name__}")
    out = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise UserError(f"{source}: entry {i} is {str(entry)[:60]!r}: expected an object with 'image' and 'caption'")
        out[str(entry["image"])] = entry["caption"]
    return out


def check_caption_sets(predictions, references) -> None:
    """predictions {id: caption string}, references {id: [caption strings]}, the same ids."""
    for name, d in (("predictions", predictions), ("references", references)):
        if not isinstance(d, dict):
            raise UserError(f"{name} must map ids to captions, got {type(d).__name__}")
    for k, v in predictions.items():
        if not isinstance(v, str):
            raise UserError(f"predictions[{k!r}] is {type(v).__name__} {str(v)[:40]!r}: expected one caption string")
    for k, v in references.items():
        if isinstance(v, str):
            raise UserError(f"references[{k!r}] is a string: expected a list of reference captions, "
                            f"e.g. {{{k!r}: [{v[:30]!r}]}}")
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(c, str) for c in v):
            raise UserError(f"references[{k!r}] is {str(v)[:60]!r}: expected a non-empty list of caption strings")
    unmatched = sorted(map(str, set(predictions) ^ set(references)))
    if unmatched:
        raise UserError(f"predictions and references must have the same ids; unmatched ({len(unmatched)}): "
                        f"{unmatched[:10]}")
    if not predictions:
        raise UserError("no captions to evaluate: predictions and references are empty")


def _missing_spice_resources() -> list[str]:
    import pycocoevalcap.spice as spice

    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    need = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    return [os.path.join(lib, f) for f in need if not os.path.isfile(os.path.join(lib, f))]


def caption_metrics(predictions: dict, references: dict, spice: bool = True, meteor: bool = True) -> dict:
    """predictions {id: caption}, references {id: [captions]} -> {metric: score} (scores in [0, 1],
    CIDEr unbounded), plus 'exact_match' and notes on anything skipped."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise MissingPackageError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from err
    check_caption_sets(predictions, references)
    if shutil.which("java") is None:
        raise MissingJavaError("caption metrics need Java on PATH (PTB tokenisation, METEOR, SPICE): install Java 17")
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": predictions[k]}] for k in references})
    out = {"notes": []}
    out["BLEU-4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    if spice:
        lacking = _missing_spice_resources()
        if lacking:
            out["notes"].append(f"SPICE skipped: Stanford CoreNLP files missing ({', '.join(lacking)}); "
                                "run pycocoevalcap's get_stanford_models once with network access")
        else:
            from pycocoevalcap.spice.spice import Spice

            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    out["exact_match"] = sum(predictions[k].strip().lower() in [r.strip().lower() for r in references[k]]
                             for k in references) / len(references)
    return out
