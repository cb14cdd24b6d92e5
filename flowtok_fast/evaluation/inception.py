"""Inception pool3 features with the clean-fid protocol ("clean" mode: PIL bicubic resize of each
channel in float to 299x299, no quantisation, then clean-fid's TorchScript Inception wrapper).
The weights come only from the file the user passes: nothing is downloaded."""
from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image

from flowtok_fast.errors import UserError

EXPECTED_NAME = "inception-2015-12-05.pt"  # the file clean-fid downloads and loads
EXPECTED_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FEATURE_DIM = 2048


def missing_message(flag: str = "--inception") -> str:
    return (f"{flag}: no Inception weights given: expected clean-fid's TorchScript file {EXPECTED_NAME} "
            f"(from {EXPECTED_URL}); nothing is downloaded")


class InceptionFeatures:
    """images (PIL) -> [N, 2048] float64 features, batched."""

    def __init__(self, path: str | None, device: str | torch.device = "cpu", batch_size: int = 64):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if not path:
            raise UserError(missing_message())
        if not os.path.isfile(path):
            raise UserError(f"--inception: file not found: {path!r} (expected clean-fid's {EXPECTED_NAME})")
        self.path = os.path.abspath(path)
        # clean-fid's wrapper loads <folder>/inception-2015-12-05.pt: show it the user's file under that name
        with tempfile.TemporaryDirectory() as folder:
            os.symlink(self.path, os.path.join(folder, EXPECTED_NAME))
            try:
                with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not the user's concern
                    warnings.simplefilter("ignore", FutureWarning)
                    model = InceptionV3W(folder, download=False, resize_inside=False)
            except Exception as err:  # noqa: BLE001 - torch.jit.load raises RuntimeError / ValueError / zip errors
                raise UserError(f"--inception {path}: not a TorchScript Inception ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}): expected clean-fid's {EXPECTED_NAME}") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.resize = build_resizer("clean")
        self.batch_size = batch_size
        # oneDNN's NHWC convolutions: ~1.5x faster on a CPU (benchmarks/eval_overhead.py), features
        # equal to ~1e-7 relative; tried on CPUs only, and dropped if the network refuses the layout
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """[3, 299, 299] float32 in [0, 255], exactly clean-fid's ResizeDataset for a PIL file."""
        arr = self.resize(np.array(image.convert("RGB")))
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        if self.memory_format == torch.channels_last:
            try:
                return self.model(batch.contiguous(memory_format=torch.channels_last))
            except RuntimeError:  # a view on an NHWC tensor inside the network: use the plain layout from now on
                self.memory_format = torch.contiguous_format
        return self.model(batch)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
            try:
                feats = self.features(batch)
            except Exception as err:  # noqa: BLE001 - a TorchScript file of another network fails here
                raise UserError(f"--inception {self.path}: the network failed on a [B, 3, 299, 299] batch "
                                f"({type(err).__name__}): expected clean-fid's {EXPECTED_NAME}") from None
            out.append(feats.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))
