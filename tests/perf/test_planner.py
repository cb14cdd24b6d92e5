"""The planner's arithmetic against hand-computed numbers (tiny config), and its measurements."""
import dataclasses
import json

import pytest

from flowtok_fast.configs import NUM_TOKENS, TINY
from flowtok_fast.errors import UserError
from flowtok_fast.perf import planner

D = TINY.generator.width  # 96


def test_state_and_memory_arithmetic():
    common = dict(params=1000, block_params=100, batch=4, act_per_sample=10, act_const=50,
                  working_per_sample=5, gpus=2, reserve_bytes=7)
    ddp = planner.memory_per_gpu(sharding="ddp", **common)
    # fp32 params 4 + grads 4 + AdamW 8 + EMA 4 bytes per parameter; activations 50 + 10*4; working 5*4
    assert ddp == {"params": 4000, "grads": 4000, "adamw": 8000, "ema": 4000, "activations": 90,
                   "recompute_working": 20, "reserve": 7, "total": 20117}
    fsdp = planner.memory_per_gpu(sharding="fsdp2", **common)
    # state halved over 2 GPUs, plus two gathered fp32 blocks (2 * 100 * 4)
    assert fsdp["total"] == 10000 + 800 + 90 + 20 + 7
    assert planner.memory_per_gpu(sharding="ddp", ema=False, **common)["total"] == 20117 - 4000
    with pytest.raises(ValueError, match="sharding"):
        planner.state_bytes(10, "zero3", 2)


def test_max_batch():
    assert planner.max_batch(budget=1000, fixed=100, per_sample=30) == 30
    assert planner.max_batch(budget=50, fixed=100, per_sample=30) == 0


def test_param_counts_by_hand():
    total, block = planner._param_counts(TINY)
    # qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, adaLN 6D^2+6D
    assert block == 18 * D * D + 15 * D
    assert total > TINY.generator.depth * block


@pytest.fixture(scope="module")
def tiny_models():
    return {p: planner.activation_model(TINY, "reference", p) for p in ("none", "attn", "full")}


def test_full_recompute_keeps_only_block_inputs(tiny_models):
    # per block and sample: the fp32 residual stream [77, D] (the conditioning vector is shared)
    assert tiny_models["full"]["per_sample_per_block"] == NUM_TOKENS * D * 4


def test_full_recompute_costs_one_block_forward(tiny_models):
    # per block and sample: 2 FLOPs per MAC of qkv, proj, fc1, fc2 (12 D^2 per token), adaLN
    # (6 D^2 per sample) and attention (2 * 77 * 77 * D)
    extra = tiny_models["full"]["train_flops_per_sample_per_block"] - tiny_models["none"]["train_flops_per_sample_per_block"]
    assert extra == 2 * (NUM_TOKENS * 12 * D * D + 6 * D * D + 2 * NUM_TOKENS * NUM_TOKENS * D)


def test_policies_trade_memory_for_flops(tiny_models):
    none, attn, full = (tiny_models[p] for p in ("none", "attn", "full"))
    assert none["per_sample"] > attn["per_sample"] > full["per_sample"]
    assert none["train_flops_per_sample"] < attn["train_flops_per_sample"] < full["train_flops_per_sample"]


def test_depth_extrapolation_equals_full_measurement():
    # deeper generator AND text VAE: the fit extrapolates both, and shares the VAE layer's share
    # (measured with the reference ops and "full") with the triton ops and the "attn" policy
    deeper = dataclasses.replace(TINY, generator=dataclasses.replace(TINY.generator, depth=3),
                                 text_vae=dataclasses.replace(TINY.text_vae, layers=3))
    for impl, policy in (("triton", "attn"),):
        fit = planner.activation_model(deeper, impl, policy, cache=False)
        direct = planner.activation_model(deeper, impl, policy, depths=None, cache=False)
        for k in ("per_sample", "const", "train_flops_per_sample"):
            assert fit[k] == pytest.approx(direct[k], rel=1e-9), (impl, policy, k)


def test_activation_cache_round_trip_and_key(monkeypatch, tmp_path):
    from flowtok_fast.perf import activation_cache

    monkeypatch.setenv("FLOWTOK_CACHE_DIR", str(tmp_path))
    first = planner.activation_model(TINY, "reference", "full")
    assert (tmp_path / "activations.json").is_file()
    calls = []
    monkeypatch.setattr(planner, "measure", lambda *a, **k: calls.append(a))
    assert planner.activation_model(TINY, "reference", "full") == first and not calls  # read back, not measured
    # another torch version or another source is another key: measured again
    k = activation_cache.key(TINY, "reference", "full", (2, 4), (1, 2))
    monkeypatch.setattr(activation_cache.torch, "__version__", "0.0")
    assert activation_cache.key(TINY, "reference", "full", (2, 4), (1, 2)) != k
    (tmp_path / "activations.json").write_text("{not json")  # a broken cache is ignored
    assert activation_cache.get(k) is None


@pytest.mark.parametrize("argv, option", [
    (["--global-batch", "-8"], "--global-batch"), (["--global-batch", "0"], "--global-batch"),
    (["--gpus", "0"], "--gpus"), (["--gpus", "-2"], "--gpus"),
    (["--gpu-mem", "0"], "--gpu-mem"), (["--gpu-mem", "-5"], "--gpu-mem"), (["--gpu-mem", "nan"], "--gpu-mem"),
    (["--global-batch", "10", "--gpus", "3"], "--global-batch"), (["--model", "Q"], "--model"),
])
def test_plan_arguments_are_validated_before_measuring(argv, option, monkeypatch):
    monkeypatch.setattr(planner, "activation_model", lambda *a, **k: pytest.fail("measured before validating"))
    base = {"--model": "tiny", "--global-batch": "16", "--gpus": "2", "--gpu-mem": "80"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    with pytest.raises(UserError, match=f"^{option}: .*expected"):
        planner.main([x for kv in base.items() for x in kv])


def test_gpu_memory_has_no_default_without_a_gpu(monkeypatch):
    monkeypatch.setattr(planner.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--gpu-mem: missing"):
        planner.main(["--model", "tiny", "--global-batch", "16", "--gpus", "2"])


def test_h200_memory_changes_the_answer():
    """The same tiny plan at two memory sizes: the budget is the parameter, not a constant."""
    small = planner.plan(TINY, 64, 2, 0.05, impls=("reference",), shardings=("ddp",), policies=("none", "full"),
                         reserve_gb=0.0)
    big = planner.plan(TINY, 64, 2, 139.0, impls=("reference",), shardings=("ddp",), policies=("none", "full"),
                       reserve_gb=0.0)
    assert big["gpu_mem_gib"] == 139.0 and "139 GiB each" in planner.format_plan(big)
    assert [r["max_batch"] for r in big["rows"]] > [r["max_batch"] for r in small["rows"]]


def test_triton_ops_measure_on_fake_tensors():
    m = planner.activation_model(TINY, "triton", "none")
    assert m["per_sample"] > 0 and m["train_flops_per_sample"] > 0


def test_plan_and_cli(tmp_path, capsys):
    p = planner.plan(TINY, global_batch=64, gpus=2, gpu_mem_gb=1.0, impls=("reference",),
                     policies=("none", "attn", "full"), reserve_gb=0.1)
    assert p["per_gpu_batch"] == 32 and len(p["rows"]) == 3 * 2
    assert p["choice"]["policy"] == "none" and p["target_met"]
    # a budget only full recompute fits: the plan says so and reports the miss within +10%
    need = {r["policy"]: r["total_gib"] for r in p["rows"] if r["sharding"] == "ddp"}
    tight = planner.plan(TINY, 64, 2, (need["full"] + need["attn"]) / 2, impls=("reference",),
                         shardings=("ddp",), policies=("none", "attn", "full"), reserve_gb=0.1)
    assert tight["choice"]["policy"] == "full" and not tight["target_met"]
    assert "over" in planner.format_plan(tight)
    out = tmp_path / "plan.json"
    assert planner.main(["--model", "tiny", "--global-batch", "16", "--gpus", "2", "--gpu-mem", "1",
                         "--ops", "reference", "--json", str(out)]) == 0
    assert "choice:" in capsys.readouterr().out
    assert json.loads(out.read_text())["per_gpu_batch"] == 8
    with pytest.raises(UserError, match="divisible"):
        planner.plan(TINY, 10, 3, 80.0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_live_bytes_equal_saved_tensor_hooks_without_recompute(impl):
    """Without checkpointing, what stays alive after the forward is exactly the unique storages
    autograd saved (minus parameters and the inputs); the tracker also sees through checkpointing,
    whose own hooks hide saved tensors from outer saved_tensors_hooks."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flowtok_fast import ops
    from flowtok_fast.perf import flops

    mode = FakeTensorMode()
    gen = ops.use(planner._fake_generator(TINY, mode), impl)
    skip = {t.untyped_storage()._cdata for t in [*gen.parameters(), *gen.buffers()]}
    saved = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with planner._kernels_accept_cpu(), mode:
        feats, z = torch.randn(4, NUM_TOKENS, TINY.text_vae.width), torch.randn(4, NUM_TOKENS, 16)
        skip |= {feats.untyped_storage()._cdata, z.untyped_storage()._cdata}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            flops.train_loss(gen, feats, z)
    hooks = sum(n for k, n in saved.items() if k not in skip)
    assert hooks == planner.measure(TINY, impl, "none", 4)["live_bytes"]
