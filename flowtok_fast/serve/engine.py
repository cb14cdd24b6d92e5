"""One padded batch of jobs -> one image per row (or one caption per image), timed per stage.

An image depends only on (prompt, seed, options), never on its batch mates: the pipeline draws the
text-VAE noise of a whole batch from ONE generator (`FlowTokPipeline.text_latents`), so row i would
depend on the rows before it. Here each row draws its own [1, 77, 16] noise from
`torch.Generator().manual_seed(seed)` -- exactly what `pipe([prompt], seed=seed)` draws -- and the
batch is assembled from the pipeline's own stages (encode_text, context_encoder, flow, decode).
Padding rows repeat the last real row and are dropped after decoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from flowtok_fast.pipeline import SamplingOptions

STAGES = ("text", "flow", "decode")


@dataclass
class Row:
    """One image to make (a request for n images is n rows, seeds seed .. seed + n - 1)."""

    prompt: str
    seed: int


@dataclass
class BatchResult:
    outputs: list  # one per real row: uint8 HWC numpy images, or caption strings
    seconds: dict = field(default_factory=dict)  # stage -> wall seconds for the whole batch


def padded(items: list, bucket: int) -> list:
    return items + [items[-1]] * (bucket - len(items))


class ImageEngine:
    """Wraps a FlowTokPipeline; every call runs on the batcher's single worker thread."""

    def __init__(self, pipe, captioner=None):
        self.pipe, self.captioner = pipe, captioner

    @property
    def resolution(self) -> int:
        return self.pipe.config.tokenizer.resolution

    def images(self, rows: list[Row], opts: SamplingOptions, bucket: int) -> BatchResult:
        """-> uint8 [H, W, 3] arrays, as to_pil would make them."""
        result = self.image_tensors(rows, opts, bucket)
        t0 = time.perf_counter()
        arr = (result.outputs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        result.seconds["decode"] += time.perf_counter() - t0
        return BatchResult(list(arr), result.seconds)

    @torch.no_grad()
    def image_tensors(self, rows: list[Row], opts: SamplingOptions, bucket: int) -> BatchResult:
        """-> outputs: [len(rows), 3, H, W] floats in [0, 1] (padding dropped)."""
        pipe, real = self.pipe, len(rows)
        rows = padded(rows, bucket)
        seconds = {}
        t0 = time.perf_counter()
        feats = pipe.encode_text([r.prompt for r in rows])
        with pipe.autocast():
            mu, logvar = pipe.generator.context_encoder(feats)
        eps = torch.cat([torch.randn((1, *mu.shape[1:]), generator=pipe.generator_rng(r.seed), device=mu.device,
                                     dtype=mu.dtype) for r in rows])
        z_text = mu + torch.exp(0.5 * logvar) * eps  # TextVAE.sample, one generator per row
        t1 = time.perf_counter()
        latents = pipe.flow(z_text, opts)
        self._sync()
        t2 = time.perf_counter()
        images = pipe.decode(latents, feats)[:real]
        self._sync()
        seconds.update(text=t1 - t0, flow=t2 - t1, decode=time.perf_counter() - t2)
        return BatchResult(images, seconds)

    @torch.no_grad()
    def captions(self, pixels: list[torch.Tensor], opts: SamplingOptions, bucket: int) -> BatchResult:
        cap, real = self.captioner, len(pixels)
        batch = torch.stack(padded(pixels, bucket))
        t0 = time.perf_counter()
        z_img = cap.image_latents(batch)
        t1 = time.perf_counter()
        z_text = cap.text_latents(z_img, opts)
        self._sync()
        t2 = time.perf_counter()
        from flowtok_fast.models.text import detokenize

        texts = detokenize(cap.decode_ids(z_text).cpu())[:real]
        t3 = time.perf_counter()
        return BatchResult(texts, {"text": t1 - t0, "flow": t2 - t1, "decode": t3 - t2})

    def warm(self, buckets: list[int], opts: SamplingOptions) -> None:
        """Runs every bucket once (allocations, threads; in compile/graph mode the compile or CUDA
        graph capture for these options), so the first real request does not pay for it."""
        for b in buckets:
            self.images([Row("warm up", 0)], opts, b)

    def _sync(self) -> None:
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)
