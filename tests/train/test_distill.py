"""Few-step students (flowtok-fast distill): the fresh student is the teacher bit for bit, a short
distillation of a teacher whose flow moves beats the teacher's own one-step Euler by far, resume
is exact, and every bad input ends in one line, exit 2, nothing written."""
import json

import pytest
import torch
from PIL import Image

from flowtok_fast import flow
from flowtok_fast.deploy.stages import FlowStep
from flowtok_fast.pipeline import FlowTokPipeline
from flowtok_fast.train.distill import DistillTrainer, make_student
from flowtok_fast.train.distill_config import DistillConfig
from tests.conftest import flowing_tiny, run_cli

PROMPTS = [f"a {c} {s} number {i}" for i, (c, s) in enumerate((c, s) for c in ("red", "blue") for s in ("cat", "dog", "cup", "box"))] * 2


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    flowing_tiny(0).save_pretrained(str(d / "teacher"))
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


def _config(d, out, **kw):
    base = dict(teacher=str(d / "teacher"), out=str(out), prompts=str(d / "prompts.txt"), student_steps=(1,),
                teacher_steps=8, global_batch=8, micro_batch=8, lr=3e-3, warmup_steps=5, ema_decay=0.9, steps=30,
                ckpt_interval=1000, log_interval=1000, progress=False)
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("extra_depth", [0, 2])
def test_fresh_student_is_the_teacher_bit_for_bit(extra_depth):
    """Also with extra blocks (extra_depth): their adaLN-Zero gates start at 0, so they pass x through."""
    teacher = flowing_tiny(0)
    student = make_student(teacher.generator, teacher.config.text_vae, extra_depth).eval()
    assert len(student.blocks) == len(teacher.generator.blocks) + extra_depth
    assert not any(k.startswith("step_embedder") for k in teacher.generator.state_dict())  # the published layout
    x, t = torch.randn(3, 77, 16), torch.rand(3)
    for indicator in (torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)):
        want = teacher.generator(x, t, indicator)
        for d in (None, 0.0, 0.25, 1.0 - 1e-5):
            step = None if d is None else torch.full((3,), d)
            assert torch.equal(student(x, t, indicator, step_size=step), want)
    # the sampler paths that pass the step size: eager Euler and Heun, and the export stage
    for method in ("euler", "heun"):
        assert torch.equal(flow.sample(teacher.generator, x, 3, 2.0, method), flow.sample(student, x, 3, 2.0, method))
    for model in (teacher.generator, student):
        stage = FlowStep(model, 3, 3, 2.0, "consistent", torch.float32, "cpu")
        out = stage(x, stage.step_times("cpu")[1])
        if model is teacher.generator:
            want = out
    assert torch.equal(out, want)
    # the new blocks still learn: their gates get gradients
    if extra_depth:
        student(x, t, torch.zeros(3, dtype=torch.long), step_size=torch.full((3,), 0.5)).pow(2).mean().backward()
        assert student.blocks[-1].adaLN_modulation[-1].weight.grad.abs().sum() > 0


def test_image_loss_and_l1_distance_train(teacher_dir, tmp_path):
    """image_weight decodes the end of the flow's last step (student's and teacher's) and adds their
    pixel distance; distance=l1 and the cosine schedule run; the terms are logged apart."""
    cfg = _config(teacher_dir, tmp_path / "s", steps=2, student_steps=(1, 2), teacher_steps=4, image_weight=2.0,
                  distance="l1", schedule="cosine", extra_depth=1)
    trainer = DistillTrainer(cfg, device="cpu")
    trainer.train()
    row = trainer.history[-1]
    assert row["loss"] == pytest.approx(row["latent"] + 2.0 * row["image"], rel=1e-5) and row["image"] > 0
    assert trainer.lr_at(cfg.steps - 1) < trainer.lr_at(cfg.warmup_steps) == cfg.lr


def test_one_step_student_beats_the_teachers_one_step_by_5x(teacher_dir, tmp_path):
    trainer = DistillTrainer(_config(teacher_dir, tmp_path / "student"), device="cpu")
    trainer.train()
    teacher = trainer.teacher
    # unseen noise: the student must have learnt the map, not the training latents
    z = teacher.text_latents(teacher.encode_text(PROMPTS[:8]), torch.Generator().manual_seed(12345))
    ode = flow.sample(teacher.generator, z, 25, trainer.cfg_scale)  # the teacher's 25-step ODE end point
    assert (ode - z).pow(2).mean() > 0.05  # the flow moves
    teacher_1 = flow.sample(teacher.generator, z, 1, trainer.cfg_scale, grid="consistent")
    student_1 = flow.sample(trainer.student.eval(), z, 1, 1.0, grid="consistent")  # one row per image
    teacher_err, student_err = (teacher_1 - ode).pow(2).mean(), (student_1 - ode).pow(2).mean()
    assert student_err * 5 < teacher_err, (student_err.item(), teacher_err.item())


def test_resume_repeats_the_uninterrupted_run(teacher_dir, tmp_path):
    straight = DistillTrainer(_config(teacher_dir, tmp_path / "a", steps=4, student_steps=(1, 2)), device="cpu")
    straight.train()
    first = DistillTrainer(_config(teacher_dir, tmp_path / "b", steps=2, student_steps=(1, 2)), device="cpu")
    first.train()
    resumed = DistillTrainer(_config(teacher_dir, tmp_path / "b", steps=4, student_steps=(1, 2)), device="cpu")
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in straight.history[2:]] == [r["loss"] for r in resumed.history]


def test_cli_distils_exports_and_the_student_runs(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    code, stdout, err = run_cli(["distill", str(teacher_dir / "teacher"), "--out", str(out), "--threads", "1",
                                 f"prompts={teacher_dir / 'prompts.txt'}", "student_steps=[1,2]", "teacher_steps=4",
                                 "steps=2", "global_batch=8", "micro_batch=8", "extra_depth=1", "progress=false"], capsys)
    assert code == 0, err
    teacher_depth = json.loads((teacher_dir / "teacher" / "config.json").read_text())["config"]["generator"]["depth"]
    assert json.loads((out / "config.json").read_text())["config"]["generator"]["depth"] == teacher_depth + 1
    recipe = json.loads((out / "config.json").read_text())["sampling"]
    assert recipe["distilled_steps"] == [1, 2] and recipe["steps"] == 1 and recipe["cfg_scale"] == 1.0
    assert recipe["guidance"] == 2.0  # the teacher recommends nothing: the paper's scale
    student = FlowTokPipeline.from_pretrained(str(out))
    assert student.generator.step_conditioned and student.sampling_defaults["steps"] == 1
    code, stdout, err = run_cli(["generate", "--model-dir", str(out), "--prompt", "a red cat", "--out", str(tmp_path / "g.png")],
                                capsys)
    assert code == 0 and "sampling: 1 step(s), cfg 1" in stdout
    with pytest.warns(UserWarning, match="distilled for steps 1, 2"):
        student(["a red cat"], steps=3)
    # export-model of the run's checkpoint gives the same student directory
    again = tmp_path / "again"
    code, _, err = run_cli(["export-model", str(out) + ".run", "--out", str(again), "--ema"], capsys)
    assert code == 0, err
    other = FlowTokPipeline.from_pretrained(str(again))
    for (name, a), b in zip(student.generator.state_dict().items(), other.generator.state_dict().values()):
        assert torch.equal(a, b), name


def test_i2t_teacher_distils_from_images(tmp_path, capsys):
    from flowtok_fast.captioning import FlowTokCaptioner

    FlowTokCaptioner.random("tiny").save_pretrained(str(tmp_path / "teacher"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 20, 200 - 40 * i)).save(images / f"{i}.png")
    out = tmp_path / "student"
    code, _, err = run_cli(["distill", str(tmp_path / "teacher"), "--out", str(out), "--threads", "1", f"images={images}",
                            "student_steps=[1]", "teacher_steps=2", "steps=1", "global_batch=4", "micro_batch=4",
                            "progress=false"], capsys)
    assert code == 0, err
    _refused(["distill", str(tmp_path / "teacher"), "--out", str(tmp_path / "s2"), f"images={images}", "image_weight=1"],
             capsys, "only for a text-to-image teacher")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s2.run").exists()
    captioner = FlowTokCaptioner.from_pretrained(str(out))
    assert captioner.sampling_defaults == {"steps": 1, "cfg_scale": 1.0, "method": "euler", "grid": "consistent"}
    assert len(captioner([str(images / "0.png")])) == 1


def _refused(argv, capsys, match):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err and match in lines[0], err
    return lines[0]


def test_bad_input_is_one_line_exit_2_nothing_written(teacher_dir, tmp_path, capsys):
    prompts = f"prompts={teacher_dir / 'prompts.txt'}"
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    _refused(["distill", str(not_a_model), "--out", str(tmp_path / "s1"), prompts], capsys, "not a FlowTok model directory")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s1.run").exists()
    _refused(["distill", str(teacher_dir / "teacher"), "--out", str(tmp_path / "s2"), "images=" + str(tmp_path)], capsys,
             "give prompts=FILE")
    _refused(["distill", str(teacher_dir / "teacher"), "--out", str(tmp_path / "s5"), f"prompts={tmp_path / 'none.txt'}"],
             capsys, "no such file")
    assert not (tmp_path / "s5").exists() and not (tmp_path / "s5.run").exists()
    _refused(["distill", str(teacher_dir / "teacher"), "--out", str(tmp_path / "s3"), prompts, "student_steps=[1,3]",
              "teacher_steps=8"], capsys, "must be a multiple of every student step count")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    _refused(["distill", str(teacher_dir / "teacher"), "--out", str(existing), prompts], capsys, "pass --force")
    assert (existing / "keep.txt").read_text() == "mine"
    # a resume with changed settings: refused, the run's checkpoint untouched
    run = ["distill", str(teacher_dir / "teacher"), "--out", str(tmp_path / "s4"), "--threads", "1", prompts,
           "student_steps=[1]", "teacher_steps=2", "steps=1", "global_batch=8", "micro_batch=8", "progress=false"]
    assert run_cli(run, capsys)[0] == 0
    before = sorted(p.name for p in (tmp_path / "s4.run" / "checkpoints").iterdir())
    line = _refused([*run[:-1], "lr=0.5", "progress=false", "--force"], capsys, "resuming with changed settings")
    assert "lr=0.5" in line
    assert sorted(p.name for p in (tmp_path / "s4.run" / "checkpoints").iterdir()) == before


def test_a_student_runs_compiled_and_as_an_exported_package(tmp_path):
    """The static paths bake the step size in: compiled sampler and AOTInductor package equal eager."""
    from flowtok_fast.deploy.export import export_package
    from flowtok_fast.loading import load_package

    teacher = flowing_tiny(0)
    gen = make_student(teacher.generator, teacher.config.text_vae)
    with torch.no_grad():  # a trained student's embedder is not zero: make the step size matter
        gen.step_embedder.mlp[2].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    student = FlowTokPipeline(teacher.config, teacher.clip, gen, teacher.tokenizer, device="cpu")
    opts = student.sampling_options(steps=1, cfg_scale=1.0, grid="consistent")
    z = student.text_latents(student.encode_text(["a red cat", "a blue dog"]), student.generator_rng(3))
    # judged on the flow's output latents (the untrained decoder would blur any difference)
    eager = student.flow(z, opts)
    plain = FlowTokPipeline(teacher.config, teacher.clip, teacher.generator, teacher.tokenizer, device="cpu")
    moved = (eager - plain.flow(z, opts)).abs().max()  # what the step size changes
    assert moved > 1e-3
    compiled = FlowTokPipeline(teacher.config, teacher.clip, gen, teacher.tokenizer, device="cpu", sampler_mode="compile")
    assert (compiled.flow(z, opts) - eager).abs().max() < moved / 100
    package = export_package(student, tmp_path / "pkg", 2, 1, 1.0, "consistent", progress=False)
    packaged = load_package(package, model=student).flow(z)
    assert (packaged - eager).abs().max() < moved / 100


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_distil_the_student_one_process_does(parallelism, teacher_dir, tmp_path, capsys):
    """torchrun (gloo, 2 CPU processes x 1 micro-batch) == 1 process x 2 micro-batches: same student
    directory, EMA weights gathered from every rank (collective under FSDP) and written once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    settings = [f"prompts={teacher_dir / 'prompts.txt'}", "student_steps=[1,2]", "teacher_steps=4", "steps=3",
                "global_batch=8", "micro_batch=4", "lr=1e-3", "progress=false"]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "flowtok_fast.train.distill", str(teacher_dir / "teacher"), "--out", str(tmp_path / "two"),
           *settings, f"parallelism={parallelism}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert run_cli(["distill", str(teacher_dir / "teacher"), "--out", str(tmp_path / "one"), "--threads", "1",
                    *settings], capsys)[0] == 0
    two, one = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(two) == set(one) and any(k.startswith("generator.step_embedder") for k in one)
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{parallelism} {k}: {m}")
