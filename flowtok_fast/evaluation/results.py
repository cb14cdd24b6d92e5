"""results.json (every number, settings, versions, commit), results.md (ours beside the paper's),
and the grid PNG of the first samples with their prompts. All written atomically."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import textwrap

from PIL import Image, ImageDraw

# FlowTok paper (arXiv 2503.10772), Tables 2-4
PAPER = {
    "t2i": {
        "COCO FID-30K": {"FlowTok-XL": 10.06, "FlowTok-H": 9.67},
        "MJHQ-30K FID": {"FlowTok-XL": 7.68, "FlowTok-H": 7.15},
    },
    "i2t": {  # COCO Karpathy test split, FlowTok-XL
        "BLEU-4": {"FlowTok-XL": 37.1}, "METEOR": {"FlowTok-XL": 27.8}, "ROUGE-L": {"FlowTok-XL": 57.6},
        "CIDEr": {"FlowTok-XL": 117.0}, "SPICE": {"FlowTok-XL": 20.5},
    },
}


def versions() -> dict:
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name, module in (("clean-fid", "cleanfid"), ("open_clip_torch", "open_clip"), ("pycocoevalcap", "pycocoevalcap")):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed: say so
            out[name] = None
    return out


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: str, results: dict, rows: list[tuple[str, float | None, dict]], title: str) -> None:
    """rows: (metric, our value, {paper model: paper value})."""
    results = {**results, "versions": versions(), "commit": git_commit()}
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    lines = [f"# {title}", "", "| metric | ours | paper |", "|---|---|---|"]
    for name, ours, paper in rows:
        shown = "n/a" if ours is None else f"{ours:.2f}"
        lines.append(f"| {name} | {shown} | {', '.join(f'{k} {v}' for k, v in paper.items()) or '-'} |")
    lines += ["", f"settings: `{json.dumps(results.get('settings', {}), sort_keys=True)}`",
              f"commit: {results['commit']}", ""]
    write_atomic(os.path.join(out_dir, "results.md"), "\n".join(lines))


def prompt_grid(images: list[Image.Image], prompts: list[str], cols: int = 8, cell: int = 128) -> Image.Image:
    """Each image scaled to `cell` px with its prompt (wrapped, cut to 3 lines) below it."""
    text_h = 40
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(im.resize((cell, cell), Image.BICUBIC), (x, y))
        text = "\n".join(textwrap.wrap(prompt, width=cell // 6)[:3])
        draw.multiline_text((x + 2, y + cell + 1), text, fill="black", spacing=0)
    return grid


def save_png_atomic(image: Image.Image, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)
