"""The FlowTok training objective (spec section 3): flow matching between text and image latents,
the text-alignment contrastive loss and the text VAE's KL term.

Direction "t2i" flows from text latents (t = 0) to image latents (t = 1); "i2t" is the reverse
(image -> text) and by default drops the alignment and KL terms (weights 0).

All randomness (t, the text VAE sample, the CFG selection, dropout) is drawn from torch's global
generators, so the caller decides how it is seeded (the trainer reseeds per micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flowtok_fast.flow import SIGMA_MIN
from flowtok_fast.models.generator import check_latents
from flowtok_fast.models.text import TextVAE

DIRECTIONS = ("t2i", "i2t")
KL_FORMS = ("reference", "per_sample")
LOSS_TERMS = ("loss", "flow", "align", "kl", "text_dec")  # the keys of FlowTokObjective's output, total first


# ---------------------------------------------------------------- the pieces, each testable alone


T_SAMPLINGS = ("logit_normal", "uniform")


def sample_t(batch: int, device: torch.device | str, kind: str = "logit_normal", loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Flow times, one per sample: t = sigmoid(N(loc, scale^2)) (the reference: loc 0, scale 1),
    or t ~ U(0, 1). loc < 0 puts more samples near t = 0, where the generator must read the
    source alone (the reference puts 1.4% below t = 0.1; loc -1.5 puts 24% there)."""
    if kind == "uniform":
        return torch.rand(batch, device=device)
    if kind != "logit_normal":
        raise ValueError(f"t sampling {kind!r}: expected one of {T_SAMPLINGS}")
    return torch.sigmoid(torch.randn(batch, device=device) * scale + loc)


def flow_path(z_src: torch.Tensor, z_dst: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN):
    """x_t = (1 - (1 - sigma_min) t) z_src + t z_dst and the target velocity z_dst - (1 - sigma_min) z_src."""
    tt = t.view(-1, *([1] * (z_src.dim() - 1)))
    x_t = (1 - (1 - sigma_min) * tt) * z_src + tt * z_dst
    return x_t, z_dst - (1 - sigma_min) * z_src


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of the squared error over the 77 x 16 latent, then mean over the batch."""
    return (pred.float() - target.float()).square().flatten(1).mean(1).mean()


def alignment_loss(z_text: torch.Tensor, proj: torch.Tensor, log_temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between text latents and the projected CLIP features, local-batch negatives.

    Rows are flattened to [B, 77*16] and L2-normalised; logits = exp(log_temperature) * z @ p^T.
    """
    z = F.normalize(z_text.float().flatten(1), dim=-1)
    p = F.normalize(proj.float().flatten(1), dim=-1)
    logits = log_temperature.float().exp() * z @ p.t()
    labels = torch.arange(z.shape[0], device=z.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor, form: str = "reference") -> torch.Tensor:
    """The reference's modified KL: -0.5 * (1 + logvar - (0.3 mu)^6 - exp(logvar)) per element.

    "reference": summed over every element of the local batch (so it scales with the per-GPU
    batch, as in the original code); "per_sample": summed per sample, averaged over the batch.
    """
    if form not in KL_FORMS:
        raise ValueError(f"unknown KL form '{form}': expected one of {KL_FORMS}")
    mu, logvar = mu.float(), logvar.float()
    elem = -0.5 * (1 + logvar - (0.3 * mu).pow(6) - logvar.exp())
    return elem.sum() if form == "reference" else elem.flatten(1).sum(1).mean()


def cfg_drop(targets: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance training (the reference's "null indicator").

    Selected samples get indicator 1 and the target of the NEXT selected sample (a cyclic roll
    within the selected set), so the null branch learns a flow that ignores its own text. With
    zero or one sample selected nothing is dropped (a roll of one is the identity).
    Returns (indicator [B] int64, targets) without modifying the input.
    """
    if selected.shape != targets.shape[:1] or selected.dtype != torch.bool:
        raise ValueError(f"selected must be a bool tensor of shape [{targets.shape[0]}], got {selected.dtype} {tuple(selected.shape)}")
    idx = selected.nonzero().squeeze(1)
    indicator = torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device)
    if idx.numel() < 2:
        return indicator, targets
    indicator[idx] = 1
    out = targets.clone()
    out[idx] = targets[idx.roll(-1)]
    return indicator, out


# ---------------------------------------------------------------- the objective as a module


@dataclass(frozen=True)
class LossWeights:
    flow: float = 1.0
    align: float | None = None  # None: 1.0 for t2i, 0.0 for i2t
    kl: float | None = None  # None: 0.01 for t2i (the reference code; the paper writes 1e-4), 0.0 for i2t
    kl_form: str = "reference"
    cfg_prob: float = 0.1
    text_dec: float = 1.0  # text decoder cross-entropy (image-to-text training with a decoder)

    def resolved(self, direction: str) -> "LossWeights":
        t2i = direction == "t2i"
        return LossWeights(
            flow=self.flow,
            align=self.align if self.align is not None else (1.0 if t2i else 0.0),
            kl=self.kl if self.kl is not None else (0.01 if t2i else 0.0),
            kl_form=self.kl_form,
            cfg_prob=self.cfg_prob,
            text_dec=self.text_dec,
        )


class FlowTokObjective(nn.Module):
    """forward(clip_feats [B,77,W], z_img [B,77,16]) -> {"loss", "flow", "align", "kl"} (scalars).

    A module (not a function) so that DDP / FSDP wrap it and the text VAE, the alignment MLP and
    the temperature, which the generator owns but calls outside its forward, are inside the
    wrapped forward. Gradients reach the text VAE through z_text.
    """

    def __init__(self, generator: nn.Module, weights: LossWeights = LossWeights(), direction: str = "t2i",
                 text_decoder: nn.Module | None = None, t_sampling: str = "logit_normal",
                 t_logit_loc: float = 0.0, t_logit_scale: float = 1.0):
        super().__init__()
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t sampling '{t_sampling}': expected one of {T_SAMPLINGS}")
        if not t_logit_scale > 0:
            raise ValueError(f"t_logit_scale must be > 0, got {t_logit_scale}")
        self.t_sampling, self.t_logit = t_sampling, (t_logit_loc, t_logit_scale)
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction '{direction}': expected one of {DIRECTIONS}")
        if weights.kl_form not in KL_FORMS:
            raise ValueError(f"unknown KL form '{weights.kl_form}': expected one of {KL_FORMS}")
        if not 0.0 <= weights.cfg_prob <= 1.0:
            raise ValueError(f"cfg_prob must be in [0, 1], got {weights.cfg_prob}")
        self.generator = generator
        # image-to-text: the decoder Z_T -> CLIP ids trains jointly on the text VAE's latents (an
        # autoencoder that keeps Z_T informative while the flow learns to reach it)
        self.text_decoder = text_decoder
        self.direction = direction
        self.weights = weights.resolved(direction)

    def forward(self, clip_feats: torch.Tensor, z_img: torch.Tensor, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_latents(z_img, "z_img")
        if clip_feats.dim() != 3 or clip_feats.shape[:2] != z_img.shape[:2]:
            raise ValueError(f"clip_feats must be [{z_img.shape[0]}, {z_img.shape[1]}, width], got {tuple(clip_feats.shape)}")
        gen, w = self.generator, self.weights
        b, device = z_img.shape[0], z_img.device

        mu, logvar = gen.context_encoder(clip_feats)
        z_text = TextVAE.sample(mu, logvar)
        src, dst = (z_text, z_img.float()) if self.direction == "t2i" else (z_img.float(), z_text)
        indicator, dst = cfg_drop(dst, torch.rand(b, device=device) < w.cfg_prob)
        t = sample_t(b, device, self.t_sampling, *self.t_logit)
        x_t, v = flow_path(src, dst, t)
        flow = flow_loss(gen(x_t, t, indicator), v)

        align = alignment_loss(z_text, gen.context_projector(clip_feats), gen.t2t_temperature)
        kl = kl_loss(mu, logvar, w.kl_form)
        text_dec = torch.zeros((), device=device)
        if self.text_decoder is not None:
            if ids is None:
                raise ValueError("training with a text decoder needs the caption ids [B, 77]")
            text_dec = self.text_decoder.loss(z_text, ids.to(device))
        # every term is computed (and reaches every parameter) even at weight 0: DDP requires it
        total = w.flow * flow + w.align * align + w.kl * kl + w.text_dec * text_dec
        return {"loss": total, "flow": flow, "align": align, "kl": kl, "text_dec": text_dec}
