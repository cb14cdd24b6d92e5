"""CPU inference (issue 21): bf16 package stages store bf16 weights and compute what autocast does,
packages record the CPU they were built for and refuse one that lacks its instruction sets, every
sampler mode draws the images eager draws (within 2/255, same dtype), and `--mode auto`'s rule.

No test depends on this machine's CPU: the bf16 and instruction-set probes are patched. The one
exported package is the session's (tests/conftest.py: tiny_package, fp32)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from flowtok_fast import onednn_linear
from flowtok_fast.deploy import dtype as precision
from flowtok_fast.deploy import manifest as mf
from flowtok_fast.deploy.mode import resolve_mode
from flowtok_fast.deploy.package_pipeline import PackagePipeline
from flowtok_fast.deploy.stages import DecodeStage, FlowStep, TextStage, lowp_weights
from flowtok_fast.errors import UserError
from flowtok_fast.pipeline import FlowTokPipeline

from tests.conftest import run_cli

PROMPTS = ["a red bicycle by a lake", "two cats"]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- bf16 weights in bf16


def test_lowp_stages_equal_autocast_stages(flowing_tiny_pipeline):
    """The bf16 package's stages (weights cast once) compute exactly what the autocast stages do,
    with the matmul weights stored in bf16: about half the bytes."""
    pipe, bf16 = flowing_tiny_pipeline, torch.bfloat16
    clip, gen, tok = (lowp_weights(m, bf16) for m in (pipe.clip, pipe.generator, pipe.tokenizer))
    assert lowp_weights(pipe.generator, torch.float32) is pipe.generator
    gen_bytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert gen_bytes(gen) < 0.55 * gen_bytes(pipe.generator)
    assert clip.transformer.resblocks[0].attn.in_proj_weight.dtype == bf16  # F.linear's packed projection too
    assert pipe.generator.blocks[0].attn.qkv.weight.dtype == torch.float32  # the pipeline's own are untouched
    torch.manual_seed(0)
    ids, noise = torch.randint(0, 1000, (2, 77)), torch.randn(2, 77, 16)
    with torch.no_grad():
        for new, old in ((TextStage(clip, gen.context_encoder, bf16, "cpu"),
                          TextStage(pipe.clip, pipe.generator.context_encoder, bf16, "cpu")),):
            for a, b in zip(new(ids, noise), old(ids, noise)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        t = torch.full((4,), 0.3)
        a = FlowStep(gen, 2, 3, 2.0, "reference", bf16, "cpu")(noise, t)
        b = FlowStep(pipe.generator, 2, 3, 2.0, "reference", bf16, "cpu")(noise, t)
        assert (a - noise).abs().max() > 1e-3  # the flow moves: a comparison that can fail
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        feats = torch.randn(2, 77, pipe.config.clip.width)
        torch.testing.assert_close(DecodeStage(tok, bf16, "cpu")(noise, feats),
                                   DecodeStage(pipe.tokenizer, bf16, "cpu")(noise, feats), rtol=0, atol=0)


def test_exported_bf16_flow_stage_stores_bf16_weights(flowing_tiny_pipeline, tiny_package, tmp_path):
    """The flow stage as a bf16 package exports it (AOTInductor, ~20 CPU s: the one stage): its
    file is smaller than the session's fp32 flow.pt2 by about half the generator's fp32 bytes, and
    it steps as the autocast stage does."""
    from flowtok_fast.deploy.export import compile_stage
    from tests.conftest import PACKAGE_BATCH, PACKAGE_CFG, PACKAGE_STEPS

    pipe, bf16 = flowing_tiny_pipeline, torch.bfloat16
    step = FlowStep(lowp_weights(pipe.generator, bf16), PACKAGE_BATCH, PACKAGE_STEPS, PACKAGE_CFG, "reference", bf16, "cpu")
    x, t = torch.randn(PACKAGE_BATCH, 77, 16), torch.full((step.rows,), 0.3)
    compile_stage(step, (x, t), tmp_path / "flow.pt2")
    fp32_weights = sum(v.numel() * 4 for k, v in pipe.generator.state_dict().items()
                       if not k.startswith("context_encoder."))  # the text VAE is in the text stage
    saved = (tiny_package / "flow.pt2").stat().st_size - (tmp_path / "flow.pt2").stat().st_size
    assert saved > 0.4 * fp32_weights, (saved, fp32_weights)
    got = torch._inductor.aoti_load_package(str(tmp_path / "flow.pt2"))(x, t)
    with torch.no_grad():
        want = FlowStep(pipe.generator, PACKAGE_BATCH, PACKAGE_STEPS, PACKAGE_CFG, "reference", bf16, "cpu")(x, t)
    assert (want - x).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not onednn_linear.available(), reason="this torch has no oneDNN (mkldnn)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exported_fp32_linears_are_onednn(flowing_tiny_pipeline, dtype):
    """A CPU package's fp32 linears are traced as oneDNN's (mkldnn._linear_pointwise, called from C++
    by the package), not MKL's addmm; a bf16 stage keeps autocast's."""
    from flowtok_fast.deploy.export import export_program
    from tests.conftest import PACKAGE_BATCH, PACKAGE_CFG, PACKAGE_STEPS

    gen = flowing_tiny_pipeline.generator
    step = FlowStep(gen if dtype == torch.float32 else lowp_weights(gen, dtype), PACKAGE_BATCH, PACKAGE_STEPS,
                    PACKAGE_CFG, "reference", dtype, "cpu")
    program = export_program(step, (torch.randn(PACKAGE_BATCH, 77, 16), torch.full((step.rows,), 0.3)))
    ops = [str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
           for n in gm.graph.nodes if n.op == "call_function"]  # autocast regions are subgraphs
    onednn, other = sum("mkldnn._linear_pointwise" in o for o in ops), sum(o.startswith(("aten.linear", "aten.addmm")) for o in ops)
    if dtype == torch.float32:
        assert onednn >= 10 and other == 0, ops  # every linear of the step (15 at tiny), none left to MKL
    else:
        assert onednn == 0 and other > 0, ops


# ---------------------------------------------------------------- the CPU a package was built for


def test_manifest_records_the_build_cpu(tiny_package):
    cpu = json.loads((tiny_package / "manifest.json").read_text())["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu["requires"]) == mf.cpu_features()  # built here: everything this CPU has
    PackagePipeline.load(tiny_package)  # and this CPU passes


@pytest.mark.parametrize("dtype, lacks, words", [
    ("fp32", "avx512f", "lacks them: export the package on this machine"),
    ("bf16", "avx512_bf16", "or export with --dtype fp32"),
])
def test_refuses_a_cpu_without_the_build_instructions(tiny_package, tmp_path, monkeypatch, dtype, lacks, words):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["cpu"]["requires"] = sorted(set(manifest["cpu"]["requires"]) | {"avx2", lacks})
    if dtype == "bf16":
        manifest["dtype"] = "bf16"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(mf, "cpu_features", lambda: set(manifest["cpu"]["requires"]) - {lacks})
    with pytest.raises(UserError) as e:
        PackagePipeline.load(pkg)
    message = one_line(e)
    assert f"with {lacks} (" in message and words in message
    monkeypatch.setattr(mf, "cpu_features", lambda: set(manifest["cpu"]["requires"]))
    mf.check_cpu(manifest)  # a CPU with them all passes


def test_cpu_features_follow_the_torch_probes(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert "avx512_bf16" not in mf.cpu_features()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert "avx512_bf16" in mf.cpu_features()


# ---------------------------------------------------------------- every mode draws eager's images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_images_within_2_of_255_of_eager(flowing_tiny_pipeline, dtype):
    p = flowing_tiny_pipeline
    eager = FlowTokPipeline(p.config, p.clip, p.generator, p.tokenizer, device="cpu", dtype=dtype)
    compiled = FlowTokPipeline(p.config, p.clip, p.generator, p.tokenizer, device="cpu", dtype=dtype,
                               sampler_mode="compile")
    want = eager(PROMPTS, steps=3, cfg_scale=2.0, seed=3, output="tensor")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = compiled(PROMPTS, steps=3, cfg_scale=2.0, seed=3, output="tensor")
    assert want.std() > 0.01
    assert (got - want).abs().max() <= 2 / 255
    # fp32: the compiled flow and decoder run their linears on oneDNN; bf16: autocast's, untouched
    ran = {e.key for e in prof.key_averages()}
    rerouted = dtype == torch.float32 and onednn_linear.available()
    assert ("flowtok::onednn_linear" in ran) == rerouted, sorted(k for k in ran if "linear" in k)


# ---------------------------------------------------------------- --mode auto


@pytest.mark.parametrize("native", [False, True])
def test_mode_auto_rule(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(onednn_linear, "available", lambda: True)  # whatever this torch was built with
    mode, why = resolve_mode("auto", "cpu", torch.float32)
    assert mode == "compile" and why.startswith("mode auto -> compile") and ("--dtype bf16" in why) == native
    monkeypatch.setattr(onednn_linear, "available", lambda: False)  # a torch without oneDNN: MKL either way
    mode, why = resolve_mode("auto", "cpu", torch.float32)
    assert mode == "eager" and why.startswith("mode auto -> eager") and ("--dtype bf16" in why) == native
    mode, why = resolve_mode("auto", "cpu", torch.bfloat16)
    assert mode == ("compile" if native else "eager"), why
    assert resolve_mode("auto", "cuda", torch.bfloat16)[0] == "graph"
    assert resolve_mode("compile", "cpu", torch.float32) == ("compile", "mode compile (as asked)")
    with pytest.raises(UserError) as e:
        resolve_mode("fastest", "cpu", torch.float32)
    assert "expected one of" in one_line(e)


def test_generate_mode_auto_prints_the_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # bf16 emulated: eager (no compile here)
    code, out, err = run_cli(["generate", "--random-weights", "--device", "cpu", "--mode", "auto", "--steps", "1",
                              "--dtype", "bf16", "--prompt", "a cat", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    assert "mode auto -> eager (CPU, bf16 without native bf16" in out
    image = str(tmp_path / "g.png")
    code, out, err = run_cli(["caption", image, "--random-weights", "--device", "cpu", "--mode", "auto", "--steps", "1",
                              "--dtype", "bf16"], capsys)
    assert code == 0, err
    assert "mode auto -> eager (CPU, bf16 without native bf16" in err  # stdout holds the captions
    code, out, err = run_cli(["generate", "--random-weights", "--mode", "fastest", "--prompt", "a cat"], capsys)
    assert code == 2 and "--mode" in err and len(err.strip().splitlines()) == 1
