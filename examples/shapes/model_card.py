"""MODEL_CARD.md of the shipped shapes models, written by ship.py from what it measured (quality.json)
and from the training run's results.json: every number on the card comes from one of the two."""
from __future__ import annotations

import os
from pathlib import Path

SPLITS = {"new": "new prompts / images (seen colour-shape pairs, unseen layouts)",
          "held_out": "held-out combinations (blue triangle, yellow circle, red square: never trained on)"}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _rows(measured: dict, label: str) -> list[str]:
    rows = []
    for direction, splits in measured.items():
        for split, r in splits.items():
            n = r.get("prompts", r.get("images"))
            rows.append(f"| {label} | {direction} | {split} ({n}) | {_pct(r['colour_accuracy'])} | {_pct(r['shape_accuracy'])} |")
    return rows


def _run_rows(run: dict) -> list[str]:
    rows = []
    for direction in ("t2i", "i2t"):
        for split, ev in run.get(direction, {}).get("eval", {}).items():
            if split in SPLITS:
                rows.append(f"| {direction} | {split} | {_pct(ev.get('colour_accuracy'))} | {_pct(ev.get('shape_accuracy'))} |")
    return rows


def write_card(path: Path, q: dict, run: dict) -> None:
    prov, mach = run.get("provenance", {}), run.get("machine", {})
    ship, timings = q["shipped_by"], run.get("timings", {})
    dtype = q["storage_dtype"]
    m = q["model_config"]
    c = lambda section, key: run.get("config", {}).get(section, {}).get(key, "?")  # noqa: E731
    kib = lambda b: f"{b / 1024:.0f} KiB"  # noqa: E731
    total = sum(q["bytes"].values())
    lines = [
        "# Captioned-shapes FlowTok models (text-to-image and image-to-text)",
        "",
        "Two small FlowTok models trained from scratch on the synthetic captioned-shapes data of",
        "`examples/shapes` (32 x 32 images of one or two coloured circles, squares and triangles on black;",
        "captions from a fixed grammar such as `a red circle above a blue square`). They exist so that a",
        "fresh clone makes real images and captions on a CPU in seconds, and so that CI can check end to",
        "end that a change to the sampler, the ops layer, the kernels or the checkpoint code still gives",
        "a model that draws what the prompt says (`tests/test_shipped_models.py`).",
        "",
        "```bash",
        'flowtok-fast generate --model-dir examples/shapes/models/t2i --prompt "a red circle above a blue square" --out grid.png',
        "flowtok-fast example shapes --images 8 --out shapes_gt/        # ground-truth images to caption",
        "flowtok-fast caption shapes_gt/000.png --model-dir examples/shapes/models/i2t",
        "```",
        "",
        "![samples](samples.png)",
        "",
        "`samples.png`: the shipped t2i model on 16 new-split prompts (seed 0, 25 Euler steps, CFG 1.0).",
        "",
        "## What they are",
        "",
        f"- `t2i/`: CLIP-architecture text tower (width {m['clip']['width']}, {m['clip']['layers']} layers, **frozen at its "
        "random initialisation**:",
        f"  no pretrained weights exist offline), text VAE, DiT generator (width {m['generator']['width']}, depth "
        f"{m['generator']['depth']}, {m['generator']['heads']} heads),",
        f"  FlowTiTok decoder ({m['tokenizer']['resolution']} px, patch {m['tokenizer']['patch_size']}, width "
        f"{m['tokenizer']['decoder_width']}) with the fitted latent normalisation.",
        "- `i2t/`: FlowTiTok encoder + decoder, the i2t DiT generator with its frozen text VAE, and the",
        "  text decoder that turns text latents into CLIP token ids.",
        "- Vocabulary: only the grammar's words. The files keep the "
        f"{q['vocabulary_token_ids']} CLIP token ids the grammar uses",
        "  (rows of CLIP's 49408-row embedding and of the text decoder's head; the rest are restored as",
        "  zeros / an unreachable bias at load: `flowtok_fast/compact_storage.py`). A prompt with another",
        "  word still runs, with a warning naming the word: the model never saw it.",
        f"- Storage: parameters in **{dtype}** (buffers such as RoPE tables and the latent normalisation in",
        f"  fp32); loaded into fp32 modules. Size on disk: t2i {kib(q['bytes']['t2i'])}, i2t {kib(q['bytes']['i2t'])},",
        f"  **{total / 2**20:.2f} MiB together** (fp32 with the full vocabulary: "
        f"{sum(q['fp32_bytes'].values()) / 2**20:.1f} MiB).",
        "",
        "## How they were trained",
        "",
        f"Command: `{prov.get('command')}` at commit `{prov.get('commit')}`"
        f"{' (with uncommitted changes)' if prov.get('dirty') else ''}: tokenizer {c('tokenizer', 'steps')} steps,",
        f"text autoencoder {c('text_autoencoder', 'steps')} steps, t2i and i2t generators {c('t2i', 'steps')} and "
        f"{c('i2t', 'steps')} steps at batch {c('t2i', 'global_batch')}, {c('data', 'train_size')} training scenes",
        "drawn from the train split's captions (seen layouts of seen colour-shape pairs); the evaluation",
        f"splits are never trained on. Machine: {mach.get('cpu_model')} ({mach.get('torch_cpu_capability')}), torch "
        f"{mach.get('torch')}, {mach.get('torch_threads')} thread(s); {timings.get('total_s')} s for the whole run.",
        "Digests of that run (`python -m examples.shapes.compare` prints them for yours): "
        + ", ".join(f"{k} `{v}`" for k, v in run.get("digests", {}).items()) + ".",
        "A run of the same command elsewhere can end with other numbers (README: reproducible to the digit",
        "on one machine, not across machines).",
        "",
        f"Shipped with `{ship['command']}` at commit `{ship.get('commit')}` (stores, measures and writes this card).",
        "",
        "## Measured accuracies",
        "",
        "The example's evaluator (`examples/shapes/evaluate.py`): colour and shape of every object found",
        "in the generated image (t2i) or named in the caption (i2t), matched to the reference by position.",
        f"Sampling: Euler, {q['sampling']['steps']} steps, CFG {q['sampling']['cfg_scale']}, reference time grid, "
        f"seed {q['sampling']['seed']}. Protocol `card`",
        "(`examples/shapes/quality.py`): t2i on all 86 new-split prompts and 100 held-out prompts; i2t on",
        "200 new-split and 200 held-out images drawn as the example's evaluation sets (seed 0, jitter 0.25).",
        "",
        "| weights | direction | split (count) | colour | shape |",
        "|---|---|---|---|---|",
    ]
    for label in ("float32", "bfloat16", "float16"):
        lines += _rows(q["card"][label], label + (" (shipped)" if label == dtype else ""))
    lines += [
        "",
        f"Largest change against fp32: bf16 {q['points_from_fp32']['bfloat16']:.2f} points, fp16 "
        f"{q['points_from_fp32']['float16']:.2f} points (allowed: {q['tolerance_points']}); the closer one is shipped.",
        "",
        "Protocol `ci` (what `tests/test_shipped_models.py` re-measures on every CI run and requires within",
        "3 points of): 66 new-split prompts (t2i, batches of 6) and the first 64 new-split evaluation images (i2t).",
        "",
        "| weights | direction | split (count) | colour | shape |",
        "|---|---|---|---|---|",
        *_rows(q["ci"], dtype),
        "",
        f"The training run's own evaluation (fp32, its results.json: {c('sample', 'prompts')} prompts or "
        f"{c('caption', 'images')} images per split,",
        "another sample of prompts than the `card` protocol's):",
        "",
        "| direction | split | colour | shape |",
        "|---|---|---|---|",
        *_run_rows(run),
        "",
        "## Limits",
        "",
        "- 32 x 32 pixels, black backgrounds, the grammar's five colours, three shapes and four relations.",
        "- Held-out colour-shape combinations are much weaker than new layouts of seen ones (tables).",
        "- t2i is best at CFG 1.0 (the example's measurements: CFG 2.0 and 4.0 lose accuracy).",
        "- Retrain: `python -m examples.shapes.run --out RUN` then `python -m examples.shapes.ship RUN`.",
        "",
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
