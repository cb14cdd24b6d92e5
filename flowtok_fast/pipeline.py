"""Text-to-image end to end: prompts -> CLIP -> text VAE -> flow -> tokenizer decoder -> images."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flowtok_fast import checkpoint as ckpt
from flowtok_fast import compact_storage, flow, ops
from flowtok_fast.configs import FlowTokConfig, get_config
from flowtok_fast.errors import FlowTokWarning, UserError
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import ClipTextEncoder, TextVAE, overlong_prompts, tokenize
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.validate import check_prompts, finite_float, nonneg_int, one_of, positive_int, resolve_device

OUTPUT_KINDS = ("pil", "tensor")


@dataclass
class SamplingOptions:
    """Checked when made: steps >= 1, a finite guidance scale, seed >= 0, a known sampler and grid."""

    steps: int = 20
    cfg_scale: float = 2.0
    seed: int = 0
    method: str = "euler"
    grid: str = "reference"

    def __post_init__(self):
        positive_int(self.steps, "steps")
        self.cfg_scale = finite_float(self.cfg_scale, "cfg_scale")
        nonneg_int(self.seed, "seed")
        one_of(self.method, flow.METHODS, "sampler")
        one_of(self.grid, flow.GRIDS, "time grid")

    @classmethod
    def from_kwargs(cls, options: dict) -> "SamplingOptions":
        fields = list(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UserError(f"unknown sampling option(s) {unknown}: expected some of {fields}")
        return cls(**options)


def default_device() -> torch.device:
    return resolve_device(None)


def warn_if_truncated(prompts: list[str]) -> None:
    """CLIP reads 77 tokens (start + 75 + end): say so when a prompt is longer, never silently."""
    for prompt, n in overlong_prompts(prompts):
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        warnings.warn(FlowTokWarning(f"prompt {shown!r} is {n + 2} CLIP tokens long: truncated to 77 tokens"),
                      stacklevel=3)


def warn_if_unknown_words(prompts: list[str], vocabulary: frozenset[int] | None) -> None:
    """A closed-vocabulary model (the shapes example's) reads words it was never trained on as
    zeros: say which words, never silently."""
    if vocabulary is None:
        return
    from flowtok_fast.models.text import words_outside

    for prompt in prompts:
        unknown = words_outside(prompt, vocabulary)
        if unknown:
            warnings.warn(FlowTokWarning(f"prompt {prompt[:40]!r}: {', '.join(map(repr, unknown[:5]))} outside this "
                                         f"model's {len(vocabulary)}-token vocabulary (read as a blank: the model never saw it)"), stacklevel=3)


class FlowTokPipeline:
    """Holds the three networks in eval mode on one device. bf16 autocast on CUDA, fp32 on CPU
    (override with `dtype`). `fused_kernels=True` switches every op to the Triton kernels."""

    def __init__(
        self,
        config: FlowTokConfig,
        clip: ClipTextEncoder,
        generator: FlowTokGenerator,
        tokenizer: FlowTiTok,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fused_kernels: bool = False,
        sampler_mode: str = "eager",
    ):
        self.config = config
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        self.set_fused_kernels(fused_kernels)
        # "eager": flow.sample; "compile" | "graph" | "reduce-overhead": the static sampler of
        # fast_sampler.py (compiled forward; on CUDA the whole loop as one graph), built once per
        # (batch, steps, scale, grid) and reused
        from flowtok_fast.fast_sampler import MODES

        one_of(sampler_mode, MODES, "sampler mode")
        self.sampler_mode = sampler_mode
        self._fast_samplers = {}
        self.vocabulary = None  # token ids a closed-vocabulary model knows (compact_storage); None: all

    # ------------------------------------------------------------ construction

    @staticmethod
    def build(config: FlowTokConfig, with_encoder: bool = False):
        """The three networks with fresh (random) weights, built directly on the CPU."""
        return (
            ClipTextEncoder(config.clip),
            FlowTokGenerator(config.generator, config.text_vae),
            FlowTiTok(config.tokenizer, with_encoder=with_encoder),
        )

    @classmethod
    def random(cls, config: FlowTokConfig | str = "tiny", seed: int = 0, **kw) -> "FlowTokPipeline":
        """Random weights: images are noise by design (tests, demos, benchmarks)."""
        config = get_config(config) if isinstance(config, str) else config
        torch.manual_seed(seed)
        return cls(config, *cls.build(config), **kw)

    @classmethod
    def from_official(cls, checkpoint: str, tokenizer: str, clip: str, **kw) -> "FlowTokPipeline":
        """From the published files: FlowTok-{XL,H}.pth, FlowTiTok_{256,512}.bin and CLIP weights."""
        for label, path in (("--checkpoint", checkpoint), ("--tokenizer", tokenizer), ("--clip", clip)):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f"{label}: file not found: {path!r}")
        config = ckpt.config_from_official(checkpoint, tokenizer)
        with torch.device("meta"):
            clip_m, gen_m, tok_m = cls.build(config)
        for module in (clip_m, gen_m, tok_m):
            module.to_empty(device="cpu")
        ckpt.load_clip(clip_m, clip)
        ckpt.load_generator(gen_m, checkpoint)
        ckpt.load_tokenizer(tok_m, tokenizer)
        return cls(config, clip_m, gen_m, tok_m, **kw)

    @classmethod
    def from_package(cls, directory: str, **expect):
        """An exported package (`flowtok-fast export`): a PackagePipeline, called like this class
        (prompts, seed, output; steps/cfg_scale/method/grid must be the package's), with no compilation.
        `expect`: batch=, device=, dtype=, model= (a pipeline or model directory the weights must match)."""
        from flowtok_fast.deploy.package_pipeline import PackagePipeline

        return PackagePipeline.load(directory, **expect)

    @classmethod
    def from_pretrained(cls, directory: str, **kw) -> "FlowTokPipeline":
        """From a flowtok-fast directory (config.json + model.safetensors)."""
        config, parts = ckpt.read_pretrained(directory)
        missing = [c for c in ("generator", "tokenizer", "clip") if c not in parts]
        if missing:
            raise ckpt.CheckpointError(f"{directory} lacks component(s) {missing} needed for text-to-image")
        clip_m, gen_m, tok_m = cls.build(config)
        ckpt.load_strict(clip_m, parts["clip"], f"{directory} [clip]")
        ckpt.load_strict(gen_m, parts["generator"], f"{directory} [generator]")
        tok_sd = ckpt.tokenizer_state_dict(parts["tokenizer"], with_encoder=False)
        ckpt.check_tokenizer_tables(tok_sd, config.tokenizer, f"{directory} [tokenizer]")
        ckpt.load_strict(tok_m, tok_sd, f"{directory} [tokenizer]")
        pipe = cls(config, clip_m, gen_m, tok_m, **kw)
        pipe.vocabulary = compact_storage.vocabulary_of(ckpt.storage_meta(directory))
        return pipe

    def save_pretrained(self, directory: str, storage_dtype: str = "float32", vocab_rows=None) -> None:
        """storage_dtype / vocab_rows: a smaller file (flowtok_fast/compact_storage.py)."""
        ckpt.save_pretrained(directory, self.config, {"generator": self.generator, "tokenizer": self.tokenizer, "clip": self.clip},
                             storage_dtype, vocab_rows)

    def set_fused_kernels(self, enabled: bool) -> None:
        impl = "triton" if enabled else "reference"
        for module in (self.generator, self.tokenizer):
            ops.use(module, impl)
        self.fused_kernels = enabled
        self._fast_samplers = {}  # they captured the previous ops

    # ------------------------------------------------------------ stages

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP token features [B, 77, width]."""
        ids = tokenize(prompts).to(self.device)
        with self.autocast():
            return self.clip(ids)

    @torch.no_grad()
    def text_latents(self, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The flow's starting point z_text [B, 77, 16], sampled from the text VAE posterior."""
        with self.autocast():
            mu, logvar = self.generator.context_encoder(feats)
        return TextVAE.sample(mu, logvar, generator)

    @torch.no_grad()
    def flow(self, z_text: torch.Tensor, opts: SamplingOptions, progress: bool = False) -> torch.Tensor:
        if self.sampler_mode != "eager" and opts.method == "euler":
            from flowtok_fast.fast_sampler import FastSampler

            key = (z_text.shape[0], opts.steps, opts.cfg_scale, opts.grid)
            if key not in self._fast_samplers:
                self._fast_samplers[key] = FastSampler(self.generator, z_text.shape[0], opts.steps, opts.cfg_scale,
                                                       opts.grid, self.sampler_mode, self.dtype)
            return self._fast_samplers[key](z_text)
        with self.autocast():
            return flow.sample(self.generator, z_text, opts.steps, opts.cfg_scale, opts.method, opts.grid, progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], fp32."""
        with self.autocast():
            return self.tokenizer.decode(latents, feats).float()

    def generator_rng(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, progress: bool = False, output: str = "pil", **options):
        """Generate one image per prompt. options: steps, cfg_scale, seed, method, grid.
        output: 'pil' (list of PIL images) or 'tensor' ([B,3,H,W] in [0,1]). Everything is checked
        before any work; a prompt longer than CLIP's 77 tokens is truncated with a FlowTokWarning."""
        opts = SamplingOptions.from_kwargs(options)
        prompts = check_prompts(prompts)
        one_of(output, OUTPUT_KINDS, "output kind")
        warn_if_truncated(prompts)
        warn_if_unknown_words(prompts, self.vocabulary)
        feats = self.encode_text(prompts)
        z_text = self.text_latents(feats, self.generator_rng(opts.seed))
        images = self.decode(self.flow(z_text, opts, progress), feats)
        return to_pil(images) if output == "pil" else images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
