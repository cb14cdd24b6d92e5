"""The text side of the example: the text VAE (CLIP features -> Z_T) and a TextDecoder (Z_T ->
ids), trained together as an autoencoder of the training captions, then frozen."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from examples.shapes.record import rounded

log = logging.getLogger("shapes")


def grammar_vocab(captions: list[str]) -> torch.Tensor:
    """Every CLIP token id the captions use, with start / end of text and padding."""
    from flowtok_fast.models.text import EOT_ID, PAD_ID, SOT_ID, tokenize

    ids = tokenize(captions)
    return torch.unique(torch.cat([ids.flatten(), torch.tensor([SOT_ID, EOT_ID, PAD_ID])]))


def train_text_autoencoder(cfg: dict, out: Path, train_captions: list[str], clip, results: dict):
    """The text side, trained first and then frozen: the text VAE (CLIP features -> Z_T) and the
    TextDecoder (Z_T -> ids) as one autoencoder, cross-entropy + a small KL. The i2t flow ends at
    its Z_T (and its decoder reads them); the t2i flow starts there when
    text_autoencoder.freeze_for_t2i is set (else t2i trains its own text VAE jointly, as the paper).

    The decoder's softmax runs over the grammar's tokens only (the rows of its 49408-way head for
    the ids the captions use; the other rows get bias -1e4 afterwards, so decode_ids can only pick
    grammar tokens): the full softmax over 4.9k positions x 49408 ids would dominate the CPU time.
    """
    from flowtok_fast.configs import TINY
    from flowtok_fast.models.text import TextDecoder, TextVAE, tokenize
    from flowtok_fast.objective import kl_loss

    ac = cfg["text_autoencoder"]
    torch.manual_seed(cfg["seed"] + 3)
    vae, dec = TextVAE(TINY.text_vae), TextDecoder(TINY.text_vae, TINY.clip.vocab_size)
    vocab = grammar_vocab(train_captions)
    remap = torch.full((TINY.clip.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    caps = sorted(set(train_captions))
    ids = tokenize(caps)
    with torch.no_grad():
        feats = clip(ids)
    targets = remap[ids]
    params = list(vae.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=ac["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg["seed"] + 4)
    vae.train(), dec.train()
    history = []
    for step in range(ac["steps"]):
        idx = torch.randint(len(caps), (ac["batch"],), generator=g)
        mu, logvar = vae(feats[idx])
        z = TextVAE.sample(mu, logvar)
        x = dec.embed(z) + dec.positional_embedding
        for layer in dec.layers:
            x = layer(x)
        logits = x @ dec.head.weight[vocab].t() + dec.head.bias[vocab]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())
        kl = kl_loss(mu, logvar, "per_sample") / mu[0].numel()
        loss = ce + ac["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((ce.detach().item(), kl.detach().item()))
        if (step + 1) % max(1, ac["steps"] // 5) == 0:
            log.info(f"text autoencoder step {step + 1}/{ac['steps']}: ce {history[-1][0]:.4f} kl/elem {history[-1][1]:.3f}")
    with torch.no_grad():
        dec.head.bias[remap < 0] = -1e4
    vae.eval(), dec.eval()
    with torch.no_grad():
        mu, logvar = vae(feats)
        exact_mean = float((dec.decode_ids(mu) == ids).all(1).float().mean())
        exact_sample = float((dec.decode_ids(TextVAE.sample(mu, logvar, torch.Generator().manual_seed(0))) == ids).all(1).float().mean())
    results["text_autoencoder"] = {"steps": ac["steps"], "captions": len(caps), "vocab": len(vocab),
                                   "ce_last": history[-1][0] if history else None,
                                   "round_trip_exact_from_mean": exact_mean, "round_trip_exact_from_sample": exact_sample,
                                   "z_std": float(mu.std()), "sigma_mean": float((0.5 * logvar).exp().mean())}
    log.info(f"text autoencoder: {json.dumps(rounded(results['text_autoencoder']))}")
    return vae, dec
