"""Image preprocessing shared by the data paths: decode, resize the shorter side, center crop.

The arithmetic is torchvision's `Resize(size, BICUBIC, antialias=True)` + `CenterCrop(size)` on a
PIL image, which is what the reference's webdataset reader applies (its `ImageTransform`), but
written against PIL directly so torchvision is not needed at run time:
  - shorter side -> `size`, longer side -> int(size * long / short) (truncated, not rounded);
  - PIL's bicubic resampling (a = -0.5, antialiased when shrinking, uint8 output);
  - crop offset int(round((extent - size) / 2)) (Python's round: halves go to even).
The DALI pipeline (dali_pipeline.py) computes the same sizes and offsets, so both paths differ
only by decoder and resampler rounding (measured: at most 1/255 with DALI's CPU decoder).
Pixels come out as float [3, size, size] in [0, 1], no mean/std normalisation (spec section 5).
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image components, in order of preference


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size` (torchvision's rounding)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_offset(extent: int, size: int) -> int:
    """Top/left offset of a centered crop of `size` from `extent` (torchvision's center_crop)."""
    return int(round((extent - size) / 2.0))


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (so truncated or corrupt data raises here, not later) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    new_h, new_w = resized_size(height, width, size)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = center_offset(new_h, size), center_offset(new_w, size)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_pixels(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> float [3, size, size] in [0, 1]; raises on undecodable data."""
    return to_tensor(resize_center_crop(decode_rgb(data), size))
