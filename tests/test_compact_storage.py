"""Compact model directories (flowtok_fast/compact_storage.py): half-precision parameters and only
the vocabulary rows a closed-vocabulary model uses, undone at load."""
import json
import os
import warnings

import pytest
import torch

from flowtok_fast import checkpoint as ckpt
from flowtok_fast import compact_storage
from flowtok_fast.captioning import FlowTokCaptioner
from flowtok_fast.errors import FlowTokWarning, UserError
from flowtok_fast.models.text import EOT_ID, PAD_ID, SOT_ID, tokenize
from flowtok_fast.pipeline import FlowTokPipeline

PROMPTS = ["a red circle above a blue square", "a green triangle"]


def vocab_of(prompts):
    return torch.unique(torch.cat([tokenize(prompts).flatten(), torch.tensor([SOT_ID, EOT_ID, PAD_ID])]))


def rounded_copy(module, dtype):
    """The module with every parameter rounded through `dtype` (what a compact file stores)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())
    return module


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = FlowTokPipeline.random("tiny", device="cpu")
    for prm in p.generator.parameters():  # adaLN-Zero starts at zero: move every weight so the flow is not the identity
        prm.data.add_(0.02 * torch.randn_like(prm))
    return p


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pipeline_round_trip_matches_rounded_weights(pipe, tmp_path, dtype):
    vocab = vocab_of(PROMPTS)
    pipe.save_pretrained(str(tmp_path / "m"), dtype, vocab)
    loaded = FlowTokPipeline.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.generator.parameters())
    # the reference: the same pipeline with its parameters rounded through the storage dtype
    ref = FlowTokPipeline.from_pretrained(str(_plain_copy(pipe, tmp_path / "plain")), device="cpu")
    for m in (ref.clip, ref.generator, ref.tokenizer):
        rounded_copy(m, compact_storage.STORAGE_DTYPES[dtype])
    a = loaded(PROMPTS, steps=3, seed=1, output="tensor")
    b = ref(PROMPTS, steps=3, seed=1, output="tensor")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # fixed tables stay fp32 (they are checked against a recomputation at load)
    sd = ckpt.load_safetensors(tmp_path / "m" / ckpt.WEIGHTS_FILE)
    assert sd["tokenizer.decoder.positional_embedding.freqs_cos"].dtype == torch.float32
    assert sd["generator.blocks.0.attn.qkv.weight"].dtype == compact_storage.STORAGE_DTYPES[dtype]
    assert sd["clip.token_embedding.weight"].shape[0] == len(vocab)


def _plain_copy(pipe, path):
    pipe.save_pretrained(str(path))
    return path


def test_compact_file_is_small(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "full"))
    pipe.save_pretrained(str(tmp_path / "small"), "bfloat16", vocab_of(PROMPTS))
    full = os.path.getsize(tmp_path / "full" / ckpt.WEIGHTS_FILE)
    small = os.path.getsize(tmp_path / "small" / ckpt.WEIGHTS_FILE)
    emb = pipe.clip.token_embedding.weight
    assert full - small > emb.numel() * 4 * 0.95  # the 49408-row table is gone, and the rest halved
    assert small < full / 4


def test_words_outside_the_vocabulary_are_named(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "m"), "bfloat16", vocab_of(PROMPTS))
    loaded = FlowTokPipeline.from_pretrained(str(tmp_path / "m"), device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded(["a red circle above a dog"], steps=1)
        loaded(PROMPTS, steps=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, FlowTokWarning)]
    assert len(messages) == 1 and "'dog'" in messages[0] and "red" not in messages[0].split(":")[1]
    plain = FlowTokPipeline.from_pretrained(str(_plain_copy(pipe, tmp_path / "plain")), device="cpu")
    assert plain.vocabulary is None


def test_captioner_round_trip_and_refusal(tmp_path):
    torch.manual_seed(0)
    cap = FlowTokCaptioner.random("tiny", device="cpu")
    vocab = vocab_of(PROMPTS)
    with pytest.raises(UserError, match="can emit .* token id"):  # an untrained head reaches every id
        cap.save_pretrained(str(tmp_path / "refused"), "bfloat16", vocab)
    assert not (tmp_path / "refused" / ckpt.CONFIG_FILE).exists()
    keep = torch.zeros(cap.text_decoder.head.bias.shape[0], dtype=torch.bool)
    keep[vocab] = True
    with torch.no_grad():
        cap.text_decoder.head.bias[~keep] = compact_storage.UNREACHABLE_BIAS  # how the shapes example restricts it
    cap.save_pretrained(str(tmp_path / "m"), "float16", vocab)
    loaded = FlowTokCaptioner.from_pretrained(str(tmp_path / "m"), device="cpu")
    rounded_copy(cap.generator, torch.float16), rounded_copy(cap.tokenizer, torch.float16)
    rounded_copy(cap.text_decoder, torch.float16)
    with torch.no_grad():
        cap.text_decoder.head.weight[~keep] = 0
    images = torch.rand(3, 3, cap.config.tokenizer.resolution, cap.config.tokenizer.resolution)
    assert loaded(images, steps=2) == cap(images, steps=2)
    torch.testing.assert_close(loaded.text_decoder.head.bias, cap.text_decoder.head.bias, rtol=0, atol=0)


def test_damaged_storage_record_is_named(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe.save_pretrained(str(tmp_path / "m"), "bfloat16", vocab_of(PROMPTS))
    path = tmp_path / "m" / ckpt.WEIGHTS_FILE
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    storage = json.loads(meta["storage"])
    storage["vocab"]["rows"] = storage["vocab"]["rows"][:-1]  # one row fewer than stored
    save_file(load_file(str(path)), str(path), metadata={**meta, "storage": json.dumps(storage)})
    with pytest.raises(UserError, match="clip.token_embedding.weight' should hold the .* stored vocabulary rows"):
        FlowTokPipeline.from_pretrained(str(tmp_path / "m"), device="cpu")
    save_file(load_file(str(path)), str(path), metadata={**meta, "storage": "{not json"})
    with pytest.raises(UserError, match="'storage' metadata is not valid JSON"):
        FlowTokPipeline.from_pretrained(str(tmp_path / "m"), device="cpu")


def test_bad_arguments():
    t = {"clip.token_embedding.weight": torch.zeros(10, 4)}
    with pytest.raises(UserError, match="storage dtype 'int8'"):
        compact_storage.compact(t, "int8")
    with pytest.raises(UserError, match=r"ids in \[0, 10\)"):
        compact_storage.compact(t, "bfloat16", [3, 12])
    with pytest.raises(UserError, match="none of the vocabulary tables"):
        compact_storage.compact({"x": torch.zeros(3)}, "bfloat16", [1])
