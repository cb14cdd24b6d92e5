"""Checks flowtok-run's images against PackagePipeline's for the same package, ids and noise
(ctest's end-to-end test and tests/test_deploy.py). Prints the result; exit 0 when all equal.

    python -m flowtok_fast.deploy.compare_runner PKG IDS NOISE IMAGE_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowtok_fast.deploy.package_pipeline import PackagePipeline
from flowtok_fast.deploy.tokenize_ids import read_noise


def read_ids(path: str | Path) -> torch.Tensor:
    rows = [list(map(int, line.split())) for line in Path(path).read_text().splitlines() if line.strip()]
    return torch.tensor(rows, dtype=torch.long)


def python_images(package: str | Path, ids_path, noise_path) -> list[np.ndarray]:
    pipe = PackagePipeline.load(package)
    images = pipe(None, ids=read_ids(ids_path), noise=read_noise(noise_path))
    return [np.asarray(im) for im in images]


def runner_images(directory: str | Path, n: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(Path(directory) / f"{i:03d}.ppm").convert("RGB")) for i in range(n)]


def compare(package, ids_path, noise_path, image_dir) -> list[int]:
    """Largest absolute pixel difference per image (0 = identical)."""
    want = python_images(package, ids_path, noise_path)
    got = runner_images(image_dir, len(want))
    extra = sorted(p.name for p in Path(image_dir).glob("*.ppm"))[len(want):]
    if extra:
        raise AssertionError(f"the runner wrote more images than prompts: {extra}")
    return [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, want)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    diffs = compare(*args)
    print(f"{len(diffs)} image(s), largest pixel difference per image (0..255): {diffs}")
    return 0 if max(diffs) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
