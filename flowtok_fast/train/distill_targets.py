"""The teacher's side of distillation: start latents from prompts (t2i) or images (i2t), and the
teacher's guided ODE through them, cut into the steps a few-step student must learn to take.

For each student step count N and each i < N, one row: the teacher's state at t_i = i/N (times
T_END), the student's query time t_i, its step size d = T_END/N, and the target velocity
(x(t_{i+1}) - x(t_i)) / d, the straight line between the two teacher states. A student that
matches it lands, step by step, where the teacher's fine ODE lands, with guidance already in
its conditional row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flowtok_fast import flow
from flowtok_fast.errors import UserError
from flowtok_fast.evaluation.prompts import load_prompts

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


@dataclass
class StudentRows:
    x: torch.Tensor  # [R, 77, 16] teacher states
    t: torch.Tensor  # [R] query times
    step_size: torch.Tensor  # [R]
    target: torch.Tensor  # [R, 77, 16] velocity the student must output
    # image_weight > 0 only: the rows whose step ends the flow, the text features its decoder reads,
    # and the teacher's image there (decoded from its ODE end point)
    last: torch.Tensor | None = None  # [L] row indices
    feats: torch.Tensor | None = None  # [L, 77, width]
    image: torch.Tensor | None = None  # [L, 3, H, W]


class PromptList:
    """t2i data: the prompts of a file (`evaluate`'s layouts); a batch is {"prompts": [...]}."""

    def __init__(self, path: str):
        self.prompts = [r.prompt for r in load_prompts(path)]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> dict:
        return {"prompts": [self.prompts[i] for i in indices]}


class ImageFolder:
    """i2t data: every image file under a directory; a batch is {"paths": [...]} (read by the teacher)."""

    def __init__(self, path: str):
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"images={path}: not a directory: expected a folder of image files")
        self.paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            raise UserError(f"images={path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: list[int]) -> dict:
        return {"paths": [self.paths[i] for i in indices]}


def load_teacher(directory: str, device: torch.device, dtype: torch.dtype):
    """(direction, the teacher's pipeline or captioner), or a one-line UserError when `directory`
    is not a FlowTok model directory."""
    from flowtok_fast import checkpoint as ckpt

    path = Path(directory)
    if not (path / ckpt.CONFIG_FILE).is_file() or not (path / ckpt.WEIGHTS_FILE).is_file():
        raise UserError(f"teacher {directory}: not a FlowTok model directory (expected {ckpt.CONFIG_FILE} and "
                        f"{ckpt.WEIGHTS_FILE}: make one with `flowtok-fast convert` or `export-model`)")
    try:
        components = ckpt.read_components(path)
    except ckpt.CheckpointError as err:
        raise UserError(f"teacher {directory}: {err}") from None
    if "text_decoder" in components:
        from flowtok_fast.captioning import FlowTokCaptioner

        model = FlowTokCaptioner.from_pretrained(directory, device=device, dtype=dtype)
        direction = "i2t"
    else:
        from flowtok_fast.pipeline import FlowTokPipeline

        model = FlowTokPipeline.from_pretrained(directory, device=device, dtype=dtype)
        direction = "t2i"
    if model.generator.step_conditioned:
        raise UserError(f"teacher {directory} is itself a few-step student: distill from a multi-step teacher")
    return direction, model


class TeacherTrajectories:
    """Makes StudentRows for a batch: start latents, then the teacher's ODE (`teacher_steps`
    steps on the consistent grid, Euler or Heun, CFG `cfg_scale`), in no_grad."""

    def __init__(self, teacher, direction: str, student_steps: tuple[int, ...], teacher_steps: int,
                 cfg_scale: float, sampler: str = "euler", images: bool = False):
        self.teacher, self.direction = teacher, direction
        self.student_steps, self.teacher_steps = tuple(student_steps), teacher_steps
        self.cfg_scale, self.sampler = cfg_scale, sampler
        self.images = images  # t2i: also the teacher's decoded end images (DistillConfig.image_weight)

    @torch.no_grad()
    def start_latents(self, batch: dict, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(start latents, the CLIP features of the prompts: t2i only)."""
        if self.direction == "t2i":
            feats = self.teacher.encode_text(batch["prompts"])
            return self.teacher.text_latents(feats, rng), feats
        from flowtok_fast.captioning import load_images

        pixels = load_images(batch["paths"], self.teacher.config.tokenizer.resolution)
        return self.teacher.image_latents(pixels).float(), None

    @torch.no_grad()
    def trajectory(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's states at t = k * T_END / teacher_steps, k = 0..teacher_steps (fp32)."""
        times, dt = flow.time_grid(self.teacher_steps, "consistent")
        gen, x = self.teacher.generator, x0.float()
        states = [x]
        with self.teacher.autocast():
            for t in times:
                k1 = flow.guided_velocity(gen, x, t, self.cfg_scale)
                if self.sampler == "heun":
                    k2 = flow.guided_velocity(gen, x + dt * k1, t + dt, self.cfg_scale)
                    x = x + 0.5 * dt * (k1 + k2)
                else:
                    x = x + dt * k1
                states.append(x)
        return states

    def rows(self, states: list[torch.Tensor]) -> StudentRows:
        m = self.teacher_steps
        xs, ts, ds, vs = [], [], [], []
        for n in self.student_steps:
            d = flow.T_END / n
            for i in range(n):
                a, b = states[i * m // n], states[(i + 1) * m // n]
                xs.append(a)
                ts.append(torch.full((a.shape[0],), i * d))
                ds.append(torch.full((a.shape[0],), d))
                vs.append((b - a) / d)
        device = states[0].device
        return StudentRows(torch.cat(xs), torch.cat(ts).to(device), torch.cat(ds).to(device), torch.cat(vs))

    def __call__(self, batch: dict, rng: torch.Generator) -> StudentRows:
        x0, feats = self.start_latents(batch, rng)
        states = self.trajectory(x0)
        rows = self.rows(states)
        if self.images:
            groups = len(self.student_steps)  # every step count ends at the same teacher end point
            with torch.no_grad():
                rows.image = self.teacher.decode(states[-1], feats).repeat(groups, 1, 1, 1)
            b, start = x0.shape[0], 0
            last = []
            for n in self.student_steps:  # rows are grouped by step count, i = 0..n-1: the last group ends the flow
                start += n * b
                last.append(torch.arange(start - b, start))
            rows.last = torch.cat(last).to(x0.device)
            rows.feats = feats.repeat(groups, 1, 1)
        return rows
