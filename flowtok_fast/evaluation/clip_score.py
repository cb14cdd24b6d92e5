"""CLIP score of (image, prompt) pairs: 100 * max(cos(image, text), 0) per pair (the usual
definition, as in torchmetrics), from open_clip weights in a local file (ViT-L/14 by default)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

from flowtok_fast.errors import UserError


class ClipScorer:
    def __init__(self, path: str, model_name: str = "ViT-L-14", device: str | torch.device = "cpu", batch_size: int = 64):
        import open_clip

        if not os.path.isfile(path):
            raise UserError(f"--clip: file not found: {path!r} (expected open_clip {model_name} weights)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _, self.transform = open_clip.create_model_and_transforms(model_name, pretrained=path, device=device)
        except Exception as err:  # noqa: BLE001 - unknown model names and bad files raise many types
            raise UserError(f"--clip {path}: cannot load as open_clip {model_name} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
        self.model, self.path = model.eval(), path
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            pix = torch.stack([self.transform(im) for im in images[i:i + self.batch_size]]).to(self.device)
            ids = self.tokenizer(prompts[i:i + self.batch_size]).to(self.device)
            a = torch.nn.functional.normalize(self.model.encode_image(pix).float(), dim=-1)
            b = torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1)
            out.append((100 * (a * b).sum(-1).clamp(min=0)).cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros(0)
