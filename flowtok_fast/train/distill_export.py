"""A student -> a model directory: the teacher's other networks, the student generator (EMA or
raw weights), the teacher's storage (dtype, vocabulary rows) and a 'sampling' section saying
the step counts it was distilled for and the guidance built into it. Written beside the target
and renamed into place: complete or absent."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from flowtok_fast import checkpoint as ckpt
from flowtok_fast import compact_storage
from flowtok_fast.errors import UserError
from flowtok_fast.sampling import Recipe

PROVENANCE_FILE = "training.json"


def check_student_out(out: Path, force: bool) -> None:
    """Refuse --out problems before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a directory to create")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty: pass --force to replace it, or choose another directory")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def student_recipe(student_steps, cfg_scale: float) -> Recipe:
    return Recipe(steps=min(student_steps), cfg_scale=1.0, method="euler", grid="consistent",
                  distilled_steps=tuple(student_steps), guidance=float(cfg_scale),
                  how_chosen="distilled: the fewest step count it was trained for, guidance built in (cfg 1.0)")


def export_student(teacher, student, ema, cfg, cfg_scale: float, force: bool = False, use_ema: bool = True,
                   provenance: dict | None = None) -> Path:
    """Every rank calls this (gathering sharded EMA weights is collective); rank 0 writes."""
    from flowtok_fast.train.distill import make_student

    out = Path(cfg.out)
    final = make_student(teacher.generator, teacher.config.text_vae).to("cpu")
    if use_ema:
        ema.copy_to(final)
    else:
        final.load_state_dict({k: (v.full_tensor() if hasattr(v, "full_tensor") else v).reshape(final.state_dict()[k].shape)
                               for k, v in student.state_dict().items()})
    if dist.is_initialized() and dist.get_rank() != 0:
        return out
    i2t = hasattr(teacher, "text_decoder")
    components = ({"tokenizer": teacher.tokenizer, "generator": final, "text_decoder": teacher.text_decoder} if i2t
                  else {"generator": final, "tokenizer": teacher.tokenizer, "clip": teacher.clip})
    storage = ckpt.storage_meta(cfg.teacher) or {}
    vocab = storage.get("vocab")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config = dataclasses.replace(teacher.config, generator=final.cfg)  # step_conditioning on
        ckpt.save_pretrained(tmp, config, components, storage.get("dtype", "float32"),
                             vocab["rows"] if vocab else None, student_recipe(cfg.student_steps, cfg_scale).to_dict())
        record = {"teacher": str(Path(cfg.teacher).resolve()), "direction": "i2t" if i2t else "t2i", "step": None,
                  "ema": use_ema, "distill_config": cfg.to_dict(),
                  **(provenance or {})}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2))
        os.chmod(tmp, 0o755)
        if out.exists():
            if not force and any(out.iterdir()):
                raise UserError(f"--out {out} appeared while distilling: pass --force to replace it")
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_from_checkpoint(checkpoint: Path, raw: dict, out: Path, use_ema: bool) -> Path:
    """`export-model` of a distillation run's checkpoint (its train_config.json has 'teacher')."""
    import torch

    from flowtok_fast.train.distill import make_student
    from flowtok_fast.train.distill_config import DistillConfig
    from flowtok_fast.train.distill_targets import load_teacher
    from flowtok_fast.train.export_model import _load, read_generator_weights

    try:
        cfg = DistillConfig(**{**raw, "out": str(out)})
    except (TypeError, UserError) as err:
        raise UserError(f"{checkpoint}: not a readable distillation config ({err})") from None
    _, teacher = load_teacher(cfg.teacher, torch.device("cpu"), torch.float32)
    weights = read_generator_weights(checkpoint)
    student = make_student(teacher.generator, teacher.config.text_vae)
    sd = {k.removeprefix("model.generator."): v for k, v in weights.items() if k.startswith("model.generator.")}
    if use_ema:
        sd.update({k.removeprefix("ema."): v for k, v in weights.items() if k.startswith("ema.")})
    _load(student, sd, f"{checkpoint} [student{' EMA' if use_ema else ''}]")
    step = int(checkpoint.name.removeprefix("step_")) if checkpoint.name.startswith("step_") else None
    scale = cfg.cfg_scale if cfg.cfg_scale is not None else teacher.sampling.cfg_scale
    return export_student(teacher, student, None, cfg, scale, force=True, use_ema=False,
                          provenance={"checkpoint": str(checkpoint.resolve()), "step": step, "ema_weights": use_ema})
