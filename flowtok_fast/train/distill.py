"""Few-step students: `flowtok-fast distill TEACHER_DIR --out STUDENT_DIR [CONFIG.yaml] [key=value ...]`.

Method (docs/DISTILLATION.md says why): trajectory distillation with step-size conditioning. The
student starts as the teacher plus a zero-initialised step embedder (a fresh student computes
exactly the teacher), and learns to take one step of size 1/N, for each N in `student_steps`,
from the teacher's guided ODE state at t_i straight to its state at t_{i+1}: guidance built in
(one row per image), the teacher making every target from prompts (t2i) or images (i2t).

It runs like `train`: YAML + key=value, torchrun DDP/FSDP2 (parallelize.py), bf16 autocast on
CUDA, fp32 master weights and EMA, atomic checkpoints with exact resume (SIGTERM / Ctrl-C save),
progress bar and metrics.jsonl (loop.py); at the end the EMA student is written to STUDENT_DIR
(distill_export.py; `export-model OUTPUT_DIR --out DIR` does the same from any checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from flowtok_fast.configs import TextVAEConfig
from flowtok_fast.errors import UserError
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.train import checkpoint as train_ckpt
from flowtok_fast.train.data import ShardedBatches
from flowtok_fast.train.distill_config import DistillConfig, check_resumable, load_distill_config
from flowtok_fast.train.distill_targets import ImageFolder, PromptList, TeacherTrajectories, load_teacher
from flowtok_fast.train.ema import EMA
from flowtok_fast.train.loop import TrainLoop
from flowtok_fast.train.parallelize import grad_sync, parallelize
from flowtok_fast.train.schedule import learning_rate
from flowtok_fast.train.trainer import NonFiniteLossError, micro_batch_seed, process_setup


def make_student(teacher: FlowTokGenerator, text_vae: TextVAEConfig, extra_depth: int = 0) -> FlowTokGenerator:
    """The teacher's network with a zero-initialised step embedder: equal to the teacher on every
    input until trained. The text VAE, projector and temperature stay the teacher's (frozen).

    extra_depth: new DiT blocks after the teacher's. Their adaLN modulation starts at zero (DiT's
    adaLN-Zero), so each gates its attention and MLP by 0 and passes its input through exactly:
    capacity for the one-step map that still starts as the teacher."""
    if extra_depth < 0:
        raise ValueError(f"extra_depth={extra_depth}: expected >= 0")
    depth = teacher.cfg.depth
    cfg = dataclasses.replace(teacher.cfg, step_conditioning=True, depth=depth + extra_depth)
    student = FlowTokGenerator(cfg, text_vae)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    new = ("step_embedder.", *(f"blocks.{i}." for i in range(depth, depth + extra_depth)))
    if result.unexpected_keys or any(not k.startswith(new) for k in result.missing_keys):
        raise RuntimeError(f"student does not mirror the teacher: {result}")
    for part in (student.context_encoder, student.context_projector):
        part.requires_grad_(False)
    student.t2t_temperature.requires_grad_(False)
    return student


class DistillObjective(nn.Module):
    """loss = mean squared error between the student's velocity for a step of size d from (x, t)
    and the teacher's secant over that step. Conditional rows only: guidance is built in.

    image_weight > 0 (t2i): plus that weight times the mean squared error, in pixels, between the
    frozen decoder's image of the student's end point and of the teacher's, on the rows whose step
    ends the flow: the latent error weighted by what the decoder shows."""

    def __init__(self, generator: FlowTokGenerator, decode=None, image_weight: float = 0.0, distance: str = "mse"):
        super().__init__()
        self.generator = generator
        self.decode, self.image_weight = decode, image_weight  # a bound method: not a submodule to shard
        self.distance = distance

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # l1: where the student cannot tell which of several images the teacher draws, its best
        # guess is their per-value median (one of them) rather than their mean (a blend)
        return (a - b).abs().mean() if self.distance == "l1" else (a - b).pow(2).mean()

    def forward(self, x, t, step_size, target, last=None, feats=None, image=None) -> dict[str, torch.Tensor]:
        indicator = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        v = self.generator(x, t, indicator, step_size=step_size).float()
        latent = self._distance(v, target)
        if not self.image_weight:
            return {"loss": latent}  # LOG_TERMS is ("loss",) then
        end = x[last] + step_size[last, None, None] * v[last]
        pixels = self._distance(self.decode(end, feats).float(), image)
        return {"loss": latent + self.image_weight * pixels, "latent": latent.detach(), "image": pixels.detach()}


class DistillTrainer(TrainLoop):
    LOG_TERMS = ("loss",)
    BAR_DESC = "distill"

    def __init__(self, cfg: DistillConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.rank, self.world_size, self.device, self.amp_dtype = process_setup(cfg, device)
        self.grad_accum = cfg.grad_accum(self.world_size)
        if cfg.image_weight:  # the two terms of the loss, logged apart
            self.LOG_TERMS = ("loss", "latent", "image")
        self.output_dir = Path(cfg.output_dir)
        self._check_same_run()
        for key, exists in (("prompts", Path.is_file), ("images", Path.is_dir)):  # before the teacher loads
            value = getattr(cfg, key)
            if value and not exists(Path(value)):
                raise UserError(f"{key}={value}: no such {'file' if key == 'prompts' else 'directory'}")
        self.direction, self.teacher = load_teacher(cfg.teacher, self.device, self.amp_dtype or torch.float32)
        self.data_kind = self._check_data()
        self.cfg_scale = cfg.cfg_scale if cfg.cfg_scale is not None else self.teacher.sampling.cfg_scale
        if cfg.image_weight and self.direction != "t2i":
            raise UserError(f"image_weight={cfg.image_weight:g}: only for a text-to-image teacher (it decodes images)")
        self.targets = TeacherTrajectories(self.teacher, self.direction, cfg.student_steps, cfg.teacher_steps,
                                           self.cfg_scale, cfg.teacher_sampler, images=cfg.image_weight > 0)
        torch.manual_seed(cfg.seed)  # the step embedder's first layer: the same on every rank and every run
        self.student = make_student(self.teacher.generator, self.teacher.config.text_vae, cfg.extra_depth).to(self.device)
        self.objective = DistillObjective(self.student, self.teacher.tokenizer.decode if cfg.image_weight else None,
                                          cfg.image_weight, cfg.distance)
        self.model = parallelize(self.objective, cfg.parallelism, self.device, cfg.fused_kernels, cfg.recompute,
                                 cfg.compile_blocks)
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=cfg.betas, weight_decay=cfg.weight_decay,
                                           fused=True if cuda else None, foreach=None if cuda else True)
        self.ema = EMA(self.student, cfg.ema_decay)
        dataset = PromptList(cfg.prompts) if self.direction == "t2i" else ImageFolder(cfg.images)
        if len(dataset) < cfg.global_batch:
            raise UserError(f"{cfg.prompts or cfg.images}: {len(dataset)} {self.data_kind}, fewer than one global batch "
                            f"(global_batch={cfg.global_batch}): lower global_batch or give more")
        self.data = ShardedBatches(dataset, cfg.global_batch, cfg.micro_batch, self.rank, self.world_size, cfg.seed)
        self.step, self.history = 0, []
        self._maybe_resume()
        rows = sum(cfg.student_steps)
        evals = cfg.teacher_steps * (2 if cfg.teacher_sampler == "heun" else 1) * (2 if self.cfg_scale != 1.0 else 1)
        self._info(f"distilling {self.direction} teacher {cfg.teacher} (cfg {self.cfg_scale:g}) into a student for "
                   f"{', '.join(map(str, cfg.student_steps))} step(s) | per trajectory: {evals} teacher row-forwards, "
                   f"{rows} student rows | global batch {cfg.global_batch} trajectories | "
                   f"{'bf16 autocast' if self.amp_dtype else 'fp32'} on {self.device}")

    # ------------------------------------------------------------ checks before any work

    def _check_data(self) -> str:
        cfg = self.cfg
        if self.direction == "t2i":
            if not cfg.prompts:
                raise UserError(f"teacher {cfg.teacher} is text-to-image: give prompts=FILE (one prompt per line, or a "
                                "Karpathy / MJHQ JSON file)")
            if cfg.images:
                raise UserError("a text-to-image teacher learns from prompts=FILE, not images=")
            return "prompts"
        if not cfg.images:
            raise UserError(f"teacher {cfg.teacher} is image-to-text: give images=DIR (a folder of image files)")
        if cfg.prompts:
            raise UserError("an image-to-text teacher learns from images=DIR, not prompts=")
        return "images"

    def ema_student(self) -> FlowTokGenerator:
        """An unsharded CPU copy of the student with its EMA weights (collective under FSDP)."""
        final = make_student(self.teacher.generator, self.teacher.config.text_vae, self.cfg.extra_depth).to("cpu")
        self.ema.copy_to(final)
        return final

    def _check_same_run(self) -> None:
        if self.cfg.resume != "auto":
            return
        found = train_ckpt.list_checkpoints(self.output_dir) if self.output_dir.is_dir() else []
        if found:
            check_resumable(train_ckpt.read_config(found[-1]), self.cfg, str(found[-1]))

    # ------------------------------------------------------------ one step

    def lr_at(self, step: int) -> float:
        return learning_rate(step, self.cfg)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self) -> dict[str, float]:
        lr, micro_batches = self._begin_step()
        total = torch.zeros(len(self.LOG_TERMS), device=self.device)
        for m, (index, batch) in enumerate(micro_batches):
            seed = micro_batch_seed(self.cfg.seed, self.step, index)
            torch.manual_seed(seed)
            rows = self.targets(batch, torch.Generator(self.device).manual_seed(seed))
            with grad_sync(self.model, m == len(micro_batches) - 1):
                with self.autocast():
                    terms = self.model(rows.x, rows.t, rows.step_size, rows.target, rows.last, rows.feats, rows.image)
                (terms["loss"] / self.grad_accum).backward()
            total += torch.stack([terms[k].detach().float() for k in self.LOG_TERMS])
        if self.world_size > 1:
            dist.all_reduce(total)
        values = dict(zip(self.LOG_TERMS, (total / (self.grad_accum * self.world_size)).tolist()))
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1}: loss={values['loss']}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        return {"step": self.step, "lr": lr, **values}


def main(argv: list[str] | None = None) -> int:
    from flowtok_fast.cli_errors import OneLineParser
    from flowtok_fast.train.distill_export import export_student
    from flowtok_fast.validate import check_new_output_dir
    from flowtok_fast.train.trainer import distributed_run

    parser = OneLineParser(prog="flowtok-fast distill", description=(
        "Distil a FlowTok model directory (text-to-image or image-to-text) into a few-step student with "
        "guidance built in. Launch with torchrun --nproc_per_node=N for DDP or FSDP."))
    parser.add_argument("teacher", metavar="TEACHER_DIR", help="a FlowTok model directory (ours or a converted published checkpoint)")
    parser.add_argument("--out", required=True, metavar="STUDENT_DIR", help="the student's model directory, written at the end")
    parser.add_argument("--force", action="store_true", help="replace an existing STUDENT_DIR")
    parser.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="an optional YAML file, then overrides, e.g. prompts=prompts.txt student_steps=[1,2] steps=2000")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    config_file = args.settings[0] if args.settings and "=" not in args.settings[0] else None
    overrides = args.settings[1:] if config_file else args.settings
    cfg = load_distill_config(config_file, overrides, args.teacher, args.out)
    check_new_output_dir(cfg.out, args.force)  # before any model is loaded
    with distributed_run() as device:
        trainer = DistillTrainer(cfg, device=device)
        trainer.train()
        if trainer.stopped_by is None:
            final = trainer.ema_student()  # every rank: gathering FSDP-sharded EMA weights is collective
        if trainer.stopped_by is None and trainer.rank == 0:
            out = export_student(trainer.teacher, final, cfg, trainer.cfg_scale, args.force,
                                 {"step": trainer.step, "ema": True})
            print(f"wrote {out}: a {trainer.direction} student for {', '.join(map(str, cfg.student_steps))} step(s), "
                  f"guidance {trainer.cfg_scale:g} built in")
    return trainer.exit_code()


if __name__ == "__main__":
    sys.exit(main())
