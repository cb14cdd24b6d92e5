"""The map between the image tokenizer's posterior and the flow's image latents.

flow = (z - shift) * scale, element-wise over the 77 x 16 latent (z: a posterior sample or mean).
The published FlowTiTok uses shift 0 and scale 1.0143 everywhere (the default here), so official
checkpoints, which carry no such tensors, load with the reference's exact behaviour.

A tokenizer trained from scratch may give latents whose variation across images is small next to
a per-position constant (on the captioned-shapes example: std 0.36 across images, 1.03 overall);
the flow's loss is then dominated by that constant and by the posterior noise, and the part that
depends on the prompt trains slowly. `fit_latent_norm` standardises each element over a set of
posterior means (what latent-diffusion models do with one scalar scale factor, per element here).
"""
from __future__ import annotations

import torch
from torch import nn

from flowtok_fast.configs import LATENT_SCALE, NUM_TOKENS, TOKEN_CHANNELS

SHAPE = (NUM_TOKENS, TOKEN_CHANNELS)


class LatentNorm(nn.Module):
    """Buffers `shift` and `scale` [77, 16]; `to_flow` / `from_flow` convert between the tokenizer's
    [B, 16, 1, 77] posterior layout and the flow's [B, 77, 16]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.zeros(SHAPE))
        self.register_buffer("scale", torch.full(SHAPE, LATENT_SCALE))

    @staticmethod
    def reference_state_dict(prefix: str = "") -> dict[str, torch.Tensor]:
        """The published tokenizers' (implicit) values, for checkpoints without these keys."""
        return {prefix + k: v for k, v in LatentNorm().state_dict().items()}

    def is_reference(self) -> bool:
        return bool((self.shift == 0).all() and (self.scale == LATENT_SCALE).all())

    def set(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        for name, value in (("shift", shift), ("scale", scale)):
            if tuple(value.shape) != SHAPE:
                raise ValueError(f"latent {name} must be {list(SHAPE)}, got {list(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"latent {name} has non-finite values")
        if not (scale > 0).all():
            raise ValueError("latent scale must be positive everywhere")
        self.shift.copy_(shift)
        self.scale.copy_(scale)

    def to_flow(self, z: torch.Tensor) -> torch.Tensor:
        """posterior [B, 16, 1, 77] -> flow latents [B, 77, 16] (fp32)."""
        z = z.float().flatten(2).transpose(1, 2)
        return (z - self.shift) * self.scale

    def from_flow(self, x: torch.Tensor) -> torch.Tensor:
        """flow latents [B, 77, 16] -> posterior layout [B, 16, 1, 77]."""
        return (x / self.scale + self.shift).transpose(1, 2).unsqueeze(2)


def posterior_latents(moments: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Posterior moments [B, 32, 1, 77] -> z [B, 16, 1, 77] in fp32: the mean, or a sample with
    logvar clamped to [-30, 20] as the reference does."""
    mean, logvar = moments.float().chunk(2, dim=1)
    if not sample:
        return mean
    # not randn_like: it would follow the conv output's channels-last strides, and the same seed
    # would give different noise from one caller to another
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps


@torch.no_grad()
def fit_latent_norm(means: torch.Tensor, min_std: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (shift, scale) that give posterior means [N, 16, 1, 77] (or [N, 32, 1, 77]
    moments: the first 16 channels are used) zero mean and unit std over the N images. Elements
    that barely vary (std < min_std x the largest) are scaled as if their std were that floor, so
    dead latent elements do not amplify noise."""
    if means.dim() != 4 or means.shape[1] not in (TOKEN_CHANNELS, 2 * TOKEN_CHANNELS) or means.shape[2:] != (1, NUM_TOKENS):
        raise ValueError(f"expected posterior means [N, 16, 1, 77] or moments [N, 32, 1, 77], got {list(means.shape)}")
    if means.shape[0] < 2:
        raise ValueError(f"need at least 2 images to measure the latents' spread, got {means.shape[0]}")
    z = means[:, :TOKEN_CHANNELS].double().flatten(2).transpose(1, 2)  # [N, 77, 16]
    shift, std = z.mean(0), z.std(0)
    std = std.clamp_min(min_std * float(std.max()))
    return shift.float(), (1.0 / std).float()
