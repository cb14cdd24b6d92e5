"""A student -> a model directory: the teacher's other networks, the student generator (EMA or
raw weights), the teacher's storage (dtype, vocabulary rows) and a 'sampling' section saying
the step counts it was distilled for and the guidance built into it. Written as export-model
writes (export_model.write_model_directory): complete or absent."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from flowtok_fast import checkpoint as ckpt
from flowtok_fast.errors import UserError
from flowtok_fast.sampling import Recipe
from flowtok_fast.train.export_model import write_model_directory


def student_recipe(student_steps, cfg_scale: float) -> Recipe:
    return Recipe(steps=min(student_steps), cfg_scale=1.0, method="euler", grid="consistent",
                  distilled_steps=tuple(student_steps), guidance=float(cfg_scale),
                  how_chosen=f"distilled: the fewest step count it was trained for, guidance {cfg_scale:g} built "
                            "in (sampled at cfg 1.0)")


def export_student(teacher, generator, cfg, cfg_scale: float, force: bool = False, provenance: dict | None = None) -> Path:
    """Write STUDENT_DIR (cfg.out) from an unsharded student `generator`: the teacher's other
    networks, its storage (dtype, vocabulary rows) and the student's sampling recipe."""
    out = Path(cfg.out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} appeared while distilling: pass --force to replace it")
    i2t = hasattr(teacher, "text_decoder")
    components = ({"tokenizer": teacher.tokenizer, "generator": generator, "text_decoder": teacher.text_decoder} if i2t
                  else {"generator": generator, "tokenizer": teacher.tokenizer, "clip": teacher.clip})
    storage = ckpt.storage_meta(cfg.teacher) or {}
    vocab = storage.get("vocab")
    config = dataclasses.replace(teacher.config, generator=generator.cfg)  # step_conditioning on
    record = {"teacher": str(Path(cfg.teacher).resolve()), "direction": "i2t" if i2t else "t2i", "step": None,
              "distill_config": cfg.to_dict(), **(provenance or {})}
    return write_model_directory(out, config, components, record, storage_dtype=storage.get("dtype", "float32"),
                                 vocab_rows=vocab["rows"] if vocab else None,
                                 sampling=student_recipe(cfg.student_steps, cfg_scale).to_dict())


def export_from_checkpoint(checkpoint: Path, raw: dict, out: Path, use_ema: bool) -> Path:
    """`export-model` of a distillation run's checkpoint (its train_config.json has 'teacher')."""
    import torch

    from flowtok_fast.train.distill import make_student
    from flowtok_fast.train.distill_config import DistillConfig
    from flowtok_fast.train.distill_targets import load_teacher
    from flowtok_fast.train.export_model import _load, checkpoint_step, read_generator_weights

    try:
        cfg = DistillConfig(**{**raw, "out": str(out)})
    except (TypeError, UserError) as err:
        raise UserError(f"{checkpoint}: not a readable distillation config ({err})") from None
    _, teacher = load_teacher(cfg.teacher, torch.device("cpu"), torch.float32)
    weights = read_generator_weights(checkpoint)
    student = make_student(teacher.generator, teacher.config.text_vae, cfg.extra_depth)
    sd = {k.removeprefix("model.generator."): v for k, v in weights.items() if k.startswith("model.generator.")}
    if use_ema:
        sd.update({k.removeprefix("ema."): v for k, v in weights.items() if k.startswith("ema.")})
    _load(student, sd, f"{checkpoint} [student{' EMA' if use_ema else ''}]")
    scale = cfg.cfg_scale if cfg.cfg_scale is not None else teacher.sampling.cfg_scale
    return export_student(teacher, student, cfg, scale, force=True,
                          provenance={"checkpoint": str(checkpoint.resolve()), "step": checkpoint_step(checkpoint),
                                      "ema": use_ema})
