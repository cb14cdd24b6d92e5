"""The three stages as plain modules with static shapes and no randomness inside, so that
torch.export can trace them and the packages stay seeded from outside:

    TextStage    ids [B,77] int64, noise [B,77,16] fp32 -> feats [B,77,W], z_text [B,77,16]
    FlowLoop     z_text -> latents: all N guided Euler steps unrolled into one program
    FlowStep     x [B,77,16], t [2B] -> x after one guided Euler step (called N times)
    DecodeStage  latents, feats -> images [B,3,H,W] in [0,1], fp32

Each is the same math as FlowTokPipeline's eager path (flow.sample with the reference ops,
TextVAE.sample with the noise given), under autocast when dtype is not fp32.

`lowp_weights` gives the stages of a bf16 package: copies whose linear and convolution weights are
already bf16, which is exactly what autocast would feed those ops (the same rounding), so the
exported program stores them as bf16 constants (about half the bytes) instead of fp32 ones cast
on every call.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from flowtok_fast import flow

# the modules whose weights CPU and CUDA autocast cast to the low-precision dtype (linear, convolutions)
LOWP_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# nn.MultiheadAttention's packed projection (CLIP's attention keeps its names): it goes through F.linear
LOWP_PARAMS = ("in_proj_weight", "in_proj_bias")


def lowp_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` itself for fp32; else a copy with the weight and bias of every LOWP_MODULES layer (and
    LOWP_PARAMS) in `dtype`; norms, embeddings and other parameters stay fp32, as autocast leaves them."""
    if dtype == torch.float32:
        return module
    module = copy.deepcopy(module)
    for m in module.modules():
        names = ("weight", "bias") if isinstance(m, LOWP_MODULES) else LOWP_PARAMS
        for name in names:
            p = m._parameters.get(name)
            if p is not None:
                p.data = p.data.to(dtype)
    return module


def _autocast(device_type: str, dtype: torch.dtype):
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


class TextStage(nn.Module):
    def __init__(self, clip: nn.Module, text_vae: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.clip, self.text_vae, self.dtype, self.device_type = clip, text_vae, dtype, device_type

    def forward(self, ids: torch.Tensor, noise: torch.Tensor):
        with _autocast(self.device_type, self.dtype):
            feats = self.clip(ids)
            mu, logvar = self.text_vae(feats)
        return feats, mu + torch.exp(0.5 * logvar) * noise  # TextVAE.sample with eps = noise


def _guided_step(generator, x, t, indicator, dt: float, scale: float, guided: bool):
    """x + dt * (v_u + s (v_c - v_u)): ops.cfg_euler_step_ref, written without the in-place copy."""
    b = x.shape[0]
    xs = torch.cat([x, x]) if guided else x
    v = generator(xs, t, indicator, **flow.step_kwargs(generator, xs.shape[0], dt, x.device)).float()
    if not guided:
        return x + dt * v
    v_c, v_u = v[:b], v[b:]
    return x + dt * (v_u + scale * (v_c - v_u))


class _FlowBase(nn.Module):
    def __init__(self, generator: nn.Module, batch: int, steps: int, cfg_scale: float, grid: str,
                 dtype: torch.dtype, device_type: str):
        super().__init__()
        self.generator, self.dtype, self.device_type = generator, dtype, device_type
        self.guided = cfg_scale != 1.0
        self.scale = float(cfg_scale)
        rows = 2 * batch if self.guided else batch
        self.times, self.dt = flow.time_grid(steps, grid)
        # indicator rows: conditional first (0), then null (1), as flow.cfg_batch
        self.register_buffer("indicator", torch.cat([torch.zeros(batch), torch.ones(rows - batch)]).long(), persistent=False)
        self.rows = rows

    def step(self, x, t):
        with _autocast(self.device_type, self.dtype):
            return _guided_step(self.generator, x, t, self.indicator, self.dt, self.scale, self.guided)


class FlowLoop(_FlowBase):
    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0.float()
        for t in self.times:  # unrolled at trace time: N copies of the step in one program
            x = self.step(x, torch.full((self.rows,), t, dtype=torch.float32, device=x.device))
        return x


class FlowStep(_FlowBase):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.step(x.float(), t)

    def step_times(self, device) -> list[torch.Tensor]:
        """The N query-time rows FlowStep is called with, as flow.cfg_batch makes them."""
        return [torch.full((self.rows,), t, dtype=torch.float32, device=device) for t in self.times]


class DecodeStage(nn.Module):
    def __init__(self, tokenizer: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.tokenizer, self.dtype, self.device_type = tokenizer, dtype, device_type

    def forward(self, latents: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device_type, self.dtype):
            return self.tokenizer.decode(latents, feats).float()
