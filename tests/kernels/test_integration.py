"""The models on the Triton path (interpreter on CPU) against the reference path: outputs and
gradients, torch.compile(fullgraph=True) over whole blocks, and bytes saved for backward. Fresh
random weights and inputs every run (tests/kernels/conftest.py seeds and prints the seed)."""
import copy

import pytest
import torch

from flowtok_fast import ops
from flowtok_fast.configs import TINY, TokenizerConfig
from flowtok_fast.models.generator import DiTBlock, FlowTokGenerator
from flowtok_fast.models.tokenizer import Block, FlowTiTok
from flowtok_fast.models.rope import rope_2d_tables

from .utils import assert_within_ref_error, poisoned_outputs, saved_bytes


def _randomise(model):
    # DiT zero-inits adaLN and the output layer; random weights make every path matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _run(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn(model)
    out.backward(_run.grad_out if _run.grad_out.shape == out.shape else torch.ones_like(out))
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, fn, out_shape, atol=None):
    """fused (fp32) vs reference fp32, both judged against the reference in fp64."""
    ref = model.eval()
    exact = copy.deepcopy(ref).double()
    fused = ops.use(copy.deepcopy(ref), "triton")
    _run.grad_out = torch.randn(out_shape, dtype=torch.float64)
    out64, g64 = _run(exact, lambda m: fn(m, torch.float64))
    _run.grad_out = _run.grad_out.float()
    out32, g32 = _run(ref, lambda m: fn(m, torch.float32))
    with poisoned_outputs():
        outf, gf = _run(fused, lambda m: fn(m, torch.float32))
    assert_within_ref_error(outf, out32, out64, atol=atol, name="output")
    assert gf.keys() == g32.keys()
    for name in g32:
        assert_within_ref_error(gf[name], g32[name], g64[name], atol=atol, name=f"grad {name}")


def test_generator_fused_matches_reference():
    model = _randomise(FlowTokGenerator(TINY.generator, TINY.text_vae))
    x, t, ind = torch.randn(3, 77, 16), torch.rand(3), torch.tensor([0, 1, 0])
    _compare(model, lambda m, dt: m(x.to(dt), t.to(dt), ind), (3, 77, 16), atol=1e-4)


def test_tokenizer_decoder_fused_matches_reference():
    tok = _randomise(FlowTiTok(TINY.tokenizer, with_encoder=False))
    z, feats = torch.randn(1, 77, 16), torch.randn(1, 77, TINY.tokenizer.text_width)
    # the raw decoder output (no clamp), so gradients reach every pixel
    fn = lambda m, dt: m.decoder((z.to(dt) / 1.0143).transpose(1, 2).unsqueeze(2), feats.to(dt))  # noqa: E731
    _compare(tok, fn, (1, 3, 64, 64), atol=1e-4)


def test_tokenizer_encoder_fused_matches_reference():
    tok = _randomise(FlowTiTok(TINY.tokenizer))
    px = torch.rand(3, 3, 64, 64)
    _compare(tok, lambda m, dt: m.encoder(px.to(dt), m.latent_tokens), (3, 32, 1, 77), atol=1e-4)


def _blocks():
    dit = _randomise(DiTBlock(96, 2, 4.0))
    dit_in = (torch.randn(2, 77, 96, requires_grad=True), torch.randn(2, 96))
    g = 4
    blk = _randomise(Block(128, 2))
    rope = rope_2d_tables(g, 64)
    blk_in = (torch.randn(1, g * g + 154, 128, requires_grad=True), rope)
    return (dit, dit_in), (blk, blk_in)


@pytest.mark.parametrize("which", ["generator", "tokenizer"])
def test_compile_fullgraph_over_a_block_with_fused_ops(which):
    (dit, dit_in), (blk, blk_in) = _blocks()
    block, inputs = (dit, dit_in) if which == "generator" else (blk, blk_in)
    ops.use(block, "triton")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c = compiled(*inputs)
    out_c.sum().backward()
    grad_c = inputs[0].grad.clone()
    inputs[0].grad = None
    out_e = block(*inputs)
    out_e.sum().backward()
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, inputs[0].grad, atol=1e-5, rtol=1e-5)


def block_saved_bytes(block, inputs, impl: str) -> int:
    ops.use(block, impl)
    # parameters are not activations: count them out
    params = sum(p.untyped_storage().nbytes() for p in block.parameters())
    return saved_bytes(lambda: block(*inputs)) - params


def test_fused_blocks_save_markedly_less_for_backward():
    (dit, dit_in), (blk, blk_in) = _blocks()
    dit_in[1].requires_grad_()  # c comes from the timestep MLP: it needs gradients in training
    ratios = {}
    for name, block, inputs in (("generator", dit, dit_in), ("tokenizer", blk, blk_in)):
        ref = block_saved_bytes(block, inputs, "reference")
        fused = block_saved_bytes(block, inputs, "triton")
        ratios[name] = fused / ref
        print(f"{name} block saved for backward: reference {ref} B, fused {fused} B, ratio {fused / ref:.2f}")
    assert ratios["generator"] < 0.75
    assert ratios["tokenizer"] < 0.9
