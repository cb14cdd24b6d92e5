"""COCO caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

METEOR and SPICE run Java (17 works). SPICE also needs Stanford CoreNLP jars that pycocoevalcap
downloads on first use; offline, SPICE is skipped with a message naming the missing files.
"""
from __future__ import annotations

import os
import shutil


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
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from err
    missing = sorted(set(predictions) ^ set(references))
    if missing:
        raise ValueError(f"predictions and references must have the same ids; unmatched: {missing[:10]}")
    if not predictions:
        raise ValueError("no captions to evaluate")
    java = shutil.which("java") is not None
    tok = PTBTokenizer() if java else None
    if tok is None:
        raise RuntimeError("caption metrics need Java on PATH (PTB tokenisation, METEOR, SPICE)")
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
