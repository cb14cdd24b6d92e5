"""The flow between text latents (t = 0) and image latents (t = 1): time grids and samplers.

The reference Euler sampler queries the model at t_i = linspace(0, 1 - 1e-5, N)[i] while the
state advances by dt = (1 - 1e-5) / N per step. That mismatch is a quirk of the original code
but the published checkpoints' outputs depend on it, so it is the default (`grid="reference"`);
`grid="consistent"` queries at t_i = i * dt.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

SIGMA_MIN = 1e-5
T_END = 1.0 - SIGMA_MIN
GRIDS = ("reference", "consistent")
METHODS = ("euler", "heun")


def time_grid(steps: int, grid: str = "reference") -> tuple[list[float], float]:
    """Query times t_0..t_{N-1} and the (constant) step size dt."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid '{grid}': expected one of {GRIDS}")
    dt = T_END / steps
    if grid == "reference":
        times = torch.linspace(0, T_END, steps, dtype=torch.float64).tolist() if steps > 1 else [0.0]
    else:
        times = [i * dt for i in range(steps)]
    return times, dt


def cfg_batch(x: torch.Tensor, t: float, guided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs for one evaluation: with guidance ONE batch of 2B rows, conditional rows
    first (indicator 0) then null rows (indicator 1)."""
    b = x.shape[0]
    reps = 2 if guided else 1
    xs = torch.cat([x, x]) if guided else x
    ts = torch.full((reps * b,), t, device=x.device, dtype=torch.float32)
    ind = torch.zeros(reps * b, device=x.device, dtype=torch.long)
    if guided:
        ind[b:] = 1
    return xs, ts, ind


def step_kwargs(model, rows: int, dt, device) -> dict:
    """The extra model input of a few-step student (the size of the step it takes, [rows]);
    nothing for a teacher, so its calls (and traced programs) stay exactly as they were."""
    if not getattr(model, "step_conditioned", False):
        return {}
    return {"step_size": torch.full((rows,), float(dt), dtype=torch.float32, device=device)}


def guided_velocity(model, x: torch.Tensor, t: float, cfg_scale: float, dt: float = 0.0) -> torch.Tensor:
    """v_u + s * (v_c - v_u) from one batched forward (or v_c alone when s == 1)."""
    guided = cfg_scale != 1.0
    xs, ts, ind = cfg_batch(x, t, guided)
    v = model(xs, ts, ind, **step_kwargs(model, xs.shape[0], dt, x.device)).float()
    if not guided:
        return v
    v_c, v_u = v.chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def sample(
    model,
    x0: torch.Tensor,
    steps: int = 20,
    cfg_scale: float = 2.0,
    method: str = "euler",
    grid: str = "reference",
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from the text latents x0 [B,77,16] (t = 0) towards the image
    latents (t = 1 - 1e-5). Returns fp32 latents. Deterministic: no randomness inside.

    `model(x, t, indicator)` is the generator. Euler uses the model's ops layer for the fused
    update (`ops.cfg_euler_step_`), so the Triton step kernel is used when the model uses it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler '{method}': expected one of {METHODS}")
    if method == "heun" and grid == "reference":
        grid = "consistent"  # Heun needs the end point of each step, which the quirk has not
    times, dt = time_grid(steps, grid)
    x = x0.float().clone()
    ops = _ops_of(model)
    guided = cfg_scale != 1.0
    for i in tqdm(range(steps), desc=f"flow ({method}, {steps} steps)", disable=not progress, leave=False):
        if method == "euler":
            xs, ts, ind = cfg_batch(x, times[i], guided)
            v = model(xs, ts, ind, **step_kwargs(model, xs.shape[0], dt, x.device))
            if guided:
                ops.cfg_euler_step_(x, v, dt, cfg_scale)
            else:
                ops.euler_step_(x, v, dt)
        else:
            k1 = guided_velocity(model, x, times[i], cfg_scale, dt)
            x_pred = x + dt * k1
            k2 = guided_velocity(model, x_pred, times[i] + dt, cfg_scale, dt)
            x = x + 0.5 * dt * (k1 + k2)
    return x


def _ops_of(model):
    from flowtok_fast.ops import get_ops

    # the generator's blocks carry the ops namespace; a bare callable uses the reference ops
    blocks = getattr(model, "blocks", None)
    return blocks[0].ops if blocks else get_ops("reference")
