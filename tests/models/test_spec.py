"""Parameter counts, key names and shapes of the original implementation (its state-dict keys and
shapes, which the published checkpoints must load into strictly)."""
import pytest
import torch

from flowtok_fast.configs import TINY, TokenizerConfig, get_config
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import ClipTextEncoder
from flowtok_fast.models.tokenizer import FlowTiTok

# numel over the state dict: generator + text VAE + alignment MLP + temperature (spec section 1)
SPEC_COUNTS = {"B": 153_925_185, "L": 481_209_921, "XL": 698_083_905, "H": 1_092_095_553}


def _meta_generator(name):
    cfg = get_config(name)
    with torch.device("meta"):
        return FlowTokGenerator(cfg.generator, cfg.text_vae)


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_generator_parameter_counts(name):
    sd = _meta_generator(name).state_dict()
    assert sum(v.numel() for v in sd.values()) == SPEC_COUNTS[name]


def test_generator_xl_keys_and_shapes():
    sd = _meta_generator("XL").state_dict()
    expected = {
        "t2t_temperature": (),
        "pos_embed": (1, 77, 1152),
        "x_embedder.weight": (1152, 16), "x_embedder.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.0.bias": (1152,),
        "t_embedder.mlp.2.weight": (1152, 1152), "t_embedder.mlp.2.bias": (1152,),
        "y_embedder.embedding_table.weight": (2, 1152),
        "final_layer.linear.weight": (16, 1152), "final_layer.linear.bias": (16,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152), "final_layer.adaLN_modulation.1.bias": (2304,),
        "context_encoder.linear.weight": (32, 768), "context_encoder.linear.bias": (32,),
        "context_projector.0.weight": (512, 768), "context_projector.2.weight": (512, 512),
        "context_projector.4.weight": (16, 512), "context_projector.4.bias": (16,),
    }
    for i in (0, 27):
        expected.update({
            f"blocks.{i}.attn.qkv.weight": (3456, 1152), f"blocks.{i}.attn.qkv.bias": (3456,),
            f"blocks.{i}.attn.proj.weight": (1152, 1152), f"blocks.{i}.attn.proj.bias": (1152,),
            f"blocks.{i}.mlp.fc1.weight": (4608, 1152), f"blocks.{i}.mlp.fc1.bias": (4608,),
            f"blocks.{i}.mlp.fc2.weight": (1152, 4608), f"blocks.{i}.mlp.fc2.bias": (1152,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6912, 1152), f"blocks.{i}.adaLN_modulation.1.bias": (6912,),
        })
    for j in (0, 5):
        p = f"context_encoder.layers.{j}."
        for w in "QKVO":
            expected[p + f"attn.W_{w}.weight"] = (768, 768)
            expected[p + f"attn.W_{w}.bias"] = (768,)
        expected.update({
            p + "feed_forward.ffn_1.weight": (1024, 768), p + "feed_forward.ffn_2.weight": (768, 1024),
            p + "norm1.g": (768,), p + "norm1.b": (768,), p + "norm2.g": (768,), p + "norm2.b": (768,),
        })
    for k, shape in expected.items():
        assert k in sd, f"missing {k}"
        assert tuple(sd[k].shape) == shape, k
    assert "blocks.28.attn.qkv.weight" not in sd
    assert list(sd)[:3] == ["t2t_temperature", "pos_embed", "x_embedder.weight"]
    # every key belongs to one of the spec's groups
    groups = ("t2t_temperature", "pos_embed", "x_embedder.", "t_embedder.", "y_embedder.", "blocks.",
              "final_layer.", "context_encoder.", "context_projector.")
    assert all(k.startswith(groups) for k in sd)


@pytest.mark.parametrize("res,grid", [(256, 16), (512, 32)])
def test_tokenizer_counts_keys_shapes(res, grid):
    with torch.device("meta"):
        tok = FlowTiTok(TokenizerConfig(resolution=res))
    assert sum(p.numel() for p in tok.encoder.parameters()) == 85_744_160  # 85.74M
    assert sum(p.numel() for p in tok.decoder.parameters()) == 304_047_924  # 304.05M
    sd = tok.state_dict()
    expected = {
        "latent_tokens": (77, 768),
        "encoder.latent_token_positional_embedding": (77, 768),
        "encoder.patch_embed.weight": (768, 3, 16, 16),
        "encoder.positional_embedding.freqs_cos": (grid * grid, 64),
        "encoder.positional_embedding.freqs_sin": (grid * grid, 64),
        "encoder.transformer.11.mlp.w12.weight": (4096, 768),
        "encoder.transformer.11.mlp.w3.weight": (768, 2048),
        "encoder.conv_out.weight": (32, 768, 1, 1),
        "decoder.mask_token": (1, 1, 1024),
        "decoder.latent_token_positional_embedding": (77, 1024),
        "decoder.text_guidance_positional_embedding": (77, 1024),
        "decoder.decoder_embed.weight": (1024, 16),
        "decoder.positional_embedding.freqs_cos": (grid * grid, 64),
        "decoder.transformer.23.attn.qkv.weight": (3072, 1024),
        "decoder.transformer.23.mlp.w12.weight": (5460, 1024),
        "decoder.transformer.23.mlp.w3.weight": (1024, 2730),
        "decoder.transformer.23.ln_2.bias": (1024,),
        "decoder.ffn.0.weight": (768, 1024, 1, 1),
        "decoder.conv_out.weight": (3, 3, 3, 3),
        "decoder.text_guidance_proj.weight": (1024, 768),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.transformer.24.ln_1.weight" not in sd


def test_clip_text_tower_only():
    with torch.device("meta"):
        clip = ClipTextEncoder()
    sd = clip.state_dict()
    assert not any(k.startswith("visual") for k in sd)
    assert tuple(sd["transformer.resblocks.11.attn.in_proj_weight"].shape) == (2304, 768)
    assert tuple(sd["positional_embedding"].shape) == (77, 768)
    per_layer = 4 * 768 * 768 + 4 * 768 + 2 * 4 * 768 * 768 + 4 * 768 + 768 + 4 * 768  # attn, mlp, 2 LNs
    assert sum(v.numel() for v in sd.values()) == 49408 * 768 + 77 * 768 + 12 * per_layer + 2 * 768


def test_bad_generator_inputs_get_clear_errors():
    torch.manual_seed(0)
    g = FlowTokGenerator(TINY.generator, TINY.text_vae)
    x, t, y = torch.randn(2, 77, 16), torch.rand(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[B, 77, 16\]"):
        g(torch.randn(2, 76, 16), t, y)
    with pytest.raises(ValueError, match="floating-point"):
        g(x.long(), t, y)
    with pytest.raises(ValueError, match="one time per sample"):
        g(x, torch.rand(3), y)
    with pytest.raises(ValueError, match="0 = conditional"):
        g(x, t, torch.zeros(2))
