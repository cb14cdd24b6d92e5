"""A stand-in for clean-fid's inception-2015-12-05.pt: the same TorchScript interface
(`.layers` maps [B, 3, 299, 299] in [-1, 1] to 2048 features; forward(x, return_features)),
random weights and a few kFLOPs per pixel instead of Inception's ~6 GFLOPs per image, so the whole
clean-fid path runs offline in seconds on a CPU. Numbers from it mean nothing; the plumbing is real."""
import warnings

import torch
from torch import nn


class TinyInception(nn.Module):
    def __init__(self):
        super().__init__()
        # 299 -> 37x37 (stride 8) -> 8x8 pooled, 32 channels: 32 * 8 * 8 = 2048 features
        self.layers = nn.Sequential(nn.Conv2d(3, 32, 8, stride=8), nn.Tanh(), nn.AdaptiveAvgPool2d(8), nn.Flatten())

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def save_tiny_inception(path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is clean-fid's format
        torch.jit.script(TinyInception().eval()).save(str(path))
    return str(path)
