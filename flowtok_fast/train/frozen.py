"""The frozen inputs of training: CLIP text features and image latents.

Neither network trains: CLIP's text tower gives the text VAE its input, and the image tokenizer's
encoder (or pretokenised posterior moments) gives the flow's image end. Only the encoder half of
FlowTiTok is built: the 300M-parameter decoder is not needed to train.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from flowtok_fast import checkpoint as ckpt
from flowtok_fast.configs import NUM_TOKENS, FlowTokConfig
from flowtok_fast.errors import UserError
from flowtok_fast.models.latent_norm import LatentNorm, posterior_latents
from flowtok_fast.models.text import ClipTextEncoder, tokenize
from flowtok_fast.models.tokenizer import TokenizerEncoder
from flowtok_fast.train.data import validate_batch

log = logging.getLogger(__name__)


LATENT_SAMPLING = ("sample", "mean")


def latents_from_moments(moments: torch.Tensor, norm: LatentNorm | None = None, sampling: str = "sample") -> torch.Tensor:
    """Posterior moments [B,32,1,77] -> flow-space latents [B,77,16]: a posterior sample (logvar
    clamped to [-30, 20], in fp32) or, with sampling="mean", the posterior mean, through the
    tokenizer's latent normalisation (default: the reference's x 1.0143), as FlowTiTok.encode does."""
    if sampling not in LATENT_SAMPLING:
        raise ValueError(f"latent sampling {sampling!r}: expected one of {LATENT_SAMPLING}")
    z = posterior_latents(moments, sampling == "sample")
    return (norm or LatentNorm().to(z.device)).to_flow(z)


class ImageEncoder(nn.Module):
    """FlowTiTok's encoder half, with the checkpoint's key names (`latent_tokens`, `encoder.*`)."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.encoder_width
        self.cfg = cfg
        self.latent_tokens = nn.Parameter(torch.randn(NUM_TOKENS, w) * w**-0.5)
        self.encoder = TokenizerEncoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        r = self.cfg.resolution
        if pixels.shape[1:] != (3, r, r):
            raise ValueError(f"pixels must be [B, 3, {r}, {r}] in [0, 1] for this tokenizer, got {tuple(pixels.shape)}")
        return self.encoder(pixels, self.latent_tokens)  # posterior moments [B, 32, 1, 77]


class FrozenEncoders(nn.Module):
    """batch (see data.py) -> (CLIP features [B,77,W], image latents [B,77,16] in fp32)."""

    def __init__(self, clip: ClipTextEncoder, image: ImageEncoder | None = None, latent_norm: LatentNorm | None = None,
                 latent_sampling: str = "sample"):
        super().__init__()
        if latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"latent_sampling {latent_sampling!r}: expected one of {LATENT_SAMPLING}")
        self.clip = clip.eval().requires_grad_(False)
        self.image = image.eval().requires_grad_(False) if image is not None else None
        self.latent_norm = latent_norm if latent_norm is not None else LatentNorm()  # the tokenizer's flow space
        self.latent_sampling = latent_sampling

    def train(self, mode: bool = True):  # always eval: frozen, and no dropout
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        validate_batch(batch)
        ids = caption_ids(batch)
        feats = self.clip(ids.to(device, non_blocking=True))
        if "moments" in batch:
            moments = batch["moments"].to(device, non_blocking=True)
        else:
            if self.image is None:
                raise ValueError("the batch has 'pixels' but no image encoder was built: set data_kind=pixels (and tokenizer_weights)")
            moments = self.image(batch["pixels"].to(device, non_blocking=True))
        return feats, latents_from_moments(moments, self.latent_norm, self.latent_sampling)


def caption_ids(batch: dict) -> torch.Tensor:
    """The batch's CLIP token ids [B, 77]: given, or tokenised from its captions."""
    return batch["ids"] if "ids" in batch else tokenize(list(batch["text"]))


def build_frozen(cfg: FlowTokConfig, clip_weights: str | None, tokenizer_weights: str | None, with_image: bool,
                 latent_sampling: str = "sample") -> FrozenEncoders:
    """Load the frozen networks from local files; random weights only for the tiny test config.
    The tokenizer file also gives the flow space (its `latent_norm.*`, if any) for pretokenised data."""
    for key, path in (("clip_weights", clip_weights), ("tokenizer_weights", tokenizer_weights)):
        if path and not Path(path).is_file():
            raise UserError(f"{key}={path}: file not found (expected a local weights file)")
    clip = ClipTextEncoder(cfg.clip)
    if clip_weights:
        ckpt.load_clip(clip, clip_weights)
    elif cfg.name != "tiny":
        raise UserError(f"model {cfg.name} needs clip_weights: a local OpenAI CLIP ViT-L/14-336 file (random CLIP is for tiny only)")
    else:
        log.warning("CLIP text tower has random weights (tiny config, for tests only)")
    sd = ckpt.tokenizer_state_dict(ckpt.read_state_dict(tokenizer_weights)) if tokenizer_weights else None
    latent_norm = LatentNorm()
    if sd is not None:
        ckpt.load_strict(latent_norm, {k[len("latent_norm."):]: sd[k] for k in ("latent_norm.shift", "latent_norm.scale")},
                         f"tokenizer checkpoint {tokenizer_weights} [latent_norm]")
    image = None
    if with_image:
        image = ImageEncoder(cfg.tokenizer)
        if sd is not None:
            sd = {k: v for k, v in sd.items() if k == "latent_tokens" or k.startswith("encoder.")}
            ckpt.check_tokenizer_tables(sd, cfg.tokenizer, f"tokenizer checkpoint {tokenizer_weights}")
            ckpt.load_strict(image, sd, f"tokenizer checkpoint {tokenizer_weights} [encoder]")
        elif cfg.name != "tiny":
            raise UserError(f"data_kind=pixels with model {cfg.name} needs tokenizer_weights (FlowTiTok_{cfg.tokenizer.resolution}.bin)")
        else:
            log.warning("image tokenizer encoder has random weights (tiny config, for tests only)")
    return FrozenEncoders(clip, image, latent_norm, latent_sampling)
