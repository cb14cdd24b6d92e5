"""FLOPs per image, counted with torch.utils.flop_counter.FlopCounterMode on the meta device.

Nothing here is derived by hand: each number is the count of one real forward (or forward +
backward) of our modules at the real shapes, on meta tensors (no memory, no compute).

Convention, the same as the spec's section 6 figures: 2 FLOPs per multiply-accumulate of matmuls,
convolutions and attention (Q K^T and P V); elementwise ops, norms, softmax and the Euler update
are not counted. Causal masking (CLIP) is not discounted, as in FlowTok's and DiT's tables.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS, FlowTokConfig, get_config


# ------------------------------------------------------------------ attention ops torch does not know
# Without these, FlopCounterMode silently counts 0 for CPU SDPA and for our Triton attention.


def _sdpa(q_shape, k_shape, v_shape):
    b, h, n, d = q_shape
    m, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * n * m * d + 2 * b * h * n * m * dv  # Q K^T, then P V


def _register(op, formula) -> None:
    if op is not None and op not in flop_registry:
        register_flop_formula(op)(formula)


@functools.cache
def register_attention_formulas() -> None:
    aten = torch.ops.aten
    # CPU flash attention: (q, k, v, ...) and backward (grad_out, q, k, v, out, lse, ...) = 2x forward
    _register(getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),
              lambda q, k, v, *a, out_shape=None, **kw: _sdpa(q, k, v))
    _register(getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
              lambda g, q, k, v, *a, out_shape=None, **kw: 2 * _sdpa(q, k, v))
    try:  # flowtok::attention_fwd(qkv [B,N,3,H,hd], ...), attention_bwd(dout, qkv, ...)
        from flowtok_fast.kernels import attention  # noqa: F401  (registers the ops)
    except Exception:  # noqa: BLE001 - the kernels are optional for counting
        return

    def qkv_sdpa(qkv):
        b, n, _, h, d = qkv
        return _sdpa((b, h, n, d), (b, h, n, d), (b, h, n, d))

    _register(getattr(torch.ops.flowtok, "attention_fwd", None), lambda qkv, *a, out_shape=None, **kw: qkv_sdpa(qkv))
    _register(getattr(torch.ops.flowtok, "attention_bwd", None),
              lambda dout, qkv, *a, out_shape=None, **kw: 2 * qkv_sdpa(qkv))


def count(fn, *args, **kwargs) -> int:
    """Total FLOPs of fn(*args, **kwargs) (forward, and backward if fn calls it)."""
    register_attention_formulas()
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _config(model: str | FlowTokConfig, resolution: int = 256) -> FlowTokConfig:
    return model if isinstance(model, FlowTokConfig) else get_config(model, resolution)


# ------------------------------------------------------------------ per-image counts


@functools.cache
def _generator_flops(cfg: FlowTokConfig) -> int:
    from flowtok_fast.models.generator import FlowTokGenerator

    with torch.device("meta"):
        gen = FlowTokGenerator(cfg.generator, cfg.text_vae)
        x, t, ind = torch.zeros(1, NUM_TOKENS, TOKEN_CHANNELS), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        return count(gen, x, t, ind)


def generator_flops(model: str | FlowTokConfig = "XL") -> int:
    """One generator forward for one image (one row; CFG doubles the rows)."""
    return _generator_flops(_config(model))


@functools.cache
def _decoder_flops(cfg: FlowTokConfig) -> int:
    from flowtok_fast.models.tokenizer import FlowTiTok

    with torch.device("meta"):
        tok = FlowTiTok(cfg.tokenizer, with_encoder=False)
        z, feats = torch.zeros(1, NUM_TOKENS, TOKEN_CHANNELS), torch.zeros(1, NUM_TOKENS, cfg.tokenizer.text_width)
    with torch.no_grad():
        return count(tok.decode, z, feats)


def decoder_flops(model: str | FlowTokConfig = "XL", resolution: int = 256) -> int:
    """The FlowTiTok decoder for one image at `resolution` (the generator size does not matter)."""
    return _decoder_flops(_config(model, resolution))


@functools.cache
def _clip_flops(cfg: FlowTokConfig) -> int:
    from flowtok_fast.models.text import ClipTextEncoder

    with torch.device("meta"):
        clip = ClipTextEncoder(cfg.clip)
        ids = torch.zeros(1, NUM_TOKENS, dtype=torch.long)
    with torch.no_grad():
        return count(clip, ids)


def clip_flops(model: str | FlowTokConfig = "XL") -> int:
    """The CLIP text tower for one prompt."""
    return _clip_flops(_config(model))


@functools.cache
def _text_vae_flops(cfg: FlowTokConfig) -> int:
    from flowtok_fast.models.text import TextVAE

    with torch.device("meta"):
        vae = TextVAE(cfg.text_vae)
        feats = torch.zeros(1, NUM_TOKENS, cfg.text_vae.width)
    with torch.no_grad():
        return count(vae, feats)


def text_vae_flops(model: str | FlowTokConfig = "XL") -> int:
    return _text_vae_flops(_config(model))


def end_to_end(model: str | FlowTokConfig = "XL", steps: int = 20, cfg_scale: float = 2.0,
               resolution: int = 256) -> dict[str, int]:
    """FLOPs per image of text-to-image: CLIP + text VAE + evaluations x generator + decoder.
    With CFG (scale != 1) every step evaluates 2 rows per image: 2N generator forwards."""
    cfg = _config(model, resolution)
    evals = steps * (2 if cfg_scale != 1.0 else 1)
    parts = {
        "clip": clip_flops(cfg),
        "text_vae": text_vae_flops(cfg),
        "flow": evals * generator_flops(cfg),
        "decoder": decoder_flops(cfg),
    }
    parts["total"] = sum(parts.values())
    parts["generator_evals"] = evals
    return parts


# ------------------------------------------------------------------ training


def train_loss(gen, clip_feats: torch.Tensor, z_img: torch.Tensor) -> torch.Tensor:
    """The t2i training loss of `flowtok_fast.objective` without its CFG drop: text VAE ->
    z_text, logit-normal t, flow path, generator, flow + alignment + KL terms.

    The CFG drop is left out because its nonzero() has a data-dependent shape that meta and fake
    tensors cannot run; it only permutes targets and flips indicators (same FLOPs, same saved
    tensors). Falls back to a plain velocity MSE when the objective module is absent.
    """
    from flowtok_fast.models.text import TextVAE

    b = z_img.shape[0]
    mu, logvar = gen.context_encoder(clip_feats)
    z_text = TextVAE.sample(mu, logvar)
    t = torch.sigmoid(torch.randn(b, device=z_img.device))
    indicator = torch.zeros(b, dtype=torch.long, device=z_img.device)
    try:
        from flowtok_fast import objective as obj
    except ImportError:
        tt = t.view(-1, 1, 1)
        x_t, v = (1 - (1 - 1e-5) * tt) * z_text + tt * z_img, z_img - (1 - 1e-5) * z_text
        return (gen(x_t, t, indicator).float() - v).square().mean()
    x_t, v = obj.flow_path(z_text, z_img.float(), t)
    loss = obj.flow_loss(gen(x_t, t, indicator), v)
    loss = loss + obj.alignment_loss(z_text, gen.context_projector(clip_feats), gen.t2t_temperature)
    return loss + 0.01 * obj.kl_loss(mu, logvar)


@functools.cache
def _train_flops(cfg: FlowTokConfig) -> int:
    from flowtok_fast.models.generator import FlowTokGenerator

    with torch.device("meta"):
        gen = FlowTokGenerator(cfg.generator, cfg.text_vae)
        feats = torch.zeros(1, NUM_TOKENS, cfg.text_vae.width)
        z_img = torch.zeros(1, NUM_TOKENS, TOKEN_CHANNELS)
    return count(lambda: train_loss(gen, feats, z_img).backward())


def train_flops(model: str | FlowTokConfig = "XL") -> int:
    """Model FLOPs of one training sample: forward + backward of the generator, text VAE and
    alignment MLP, without recomputation (about 3x the forward). Used for training MFU."""
    return _train_flops(_config(model))


def table(models=("B", "XL", "H"), steps: int = 20, cfg_scale: float = 2.0) -> list[dict]:
    rows = []
    for m in models:
        e = end_to_end(m, steps, cfg_scale)
        rows.append({"model": m, "generator_gflop": generator_flops(m) / 1e9, "end_to_end_tflop": e["total"] / 1e12,
                     "train_gflop_per_sample": train_flops(m) / 1e9})
    return rows


if __name__ == "__main__":
    for r in table():
        print(r)
    for res in (256, 512):
        print(f"decoder {res} px: {decoder_flops('XL', res) / 1e9:.1f} GFLOP")
    print(f"CLIP text: {clip_flops() / 1e9:.2f} GFLOP")
