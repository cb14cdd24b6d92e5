"""Text-to-image end to end: prompts -> CLIP -> text VAE -> flow -> tokenizer decoder -> images."""
from __future__ import annotations

import contextlib
import os

import torch

from flowtok_fast import checkpoint as ckpt
from flowtok_fast import compact_storage, flow, ops
from flowtok_fast.configs import FlowTokConfig, get_config
from flowtok_fast.deploy.dtype import auto_dtype
from flowtok_fast.images import image_grid, to_pil  # noqa: F401  (part of this module's API)
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import ClipTextEncoder, TextVAE, tokenize
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.prompt_checks import warn_if_truncated, warn_if_unknown_words
from flowtok_fast.sampling import PAPER_T2I, Recipe, SamplingOptions
from flowtok_fast.validate import check_prompts, one_of, resolve_device

OUTPUT_KINDS = ("pil", "tensor")


def default_device() -> torch.device:
    return resolve_device(None)


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
        self.dtype = dtype or auto_dtype(self.device)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        self.set_fused_kernels(fused_kernels)
        # "eager": flow.sample; "compile" | "graph" | "reduce-overhead": the static sampler of
        # fast_sampler.py (compiled forward; on CUDA the whole loop as one graph), built once per
        # (batch, steps, scale, grid) and reused, and the decoder compiled (once per batch size)
        from flowtok_fast.fast_sampler import MODES

        one_of(sampler_mode, MODES, "sampler mode")
        self.sampler_mode = sampler_mode
        self._fast_samplers, self._decoders = {}, {}
        self.vocabulary = None  # token ids a closed-vocabulary model knows (compact_storage); None: all
        self.sampling: Recipe = PAPER_T2I  # how this model wants to be sampled (a model directory says)

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
    def random(cls, config: FlowTokConfig | str = "tiny", seed: int = 0, flowing: bool = False,
               **kw) -> "FlowTokPipeline":
        """Random weights: images are noise by design (tests, demos, benchmarks). flowing: DiT's
        zero-initialised layers drawn too (from seed + 1), else the flow does not move at all."""
        from flowtok_fast.untrained import make_flow_move

        config = get_config(config) if isinstance(config, str) else config
        torch.manual_seed(seed)
        pipe = cls(config, *cls.build(config), **kw)
        if flowing:
            make_flow_move(pipe.generator, seed + 1)
        return pipe

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
        pipe.sampling = read_recipe(directory, PAPER_T2I)
        return pipe

    def save_pretrained(self, directory: str, storage_dtype: str = "float32", vocab_rows=None) -> None:
        """storage_dtype / vocab_rows: a smaller file (flowtok_fast/compact_storage.py)."""
        ckpt.save_pretrained(directory, self.config, {"generator": self.generator, "tokenizer": self.tokenizer, "clip": self.clip},
                             storage_dtype, vocab_rows, self.sampling.to_dict())

    @property
    def sampling_defaults(self) -> dict:
        """The options a call without them uses: the model's recommendation (steps, cfg_scale, method, grid)."""
        return self.sampling.defaults

    def sampling_options(self, **given) -> SamplingOptions:
        """`given` (seed, steps, cfg_scale, method, grid; None = not given) completed from the model's
        recommendation; warns when a few-step student is asked for what it was not distilled for."""
        return self.sampling.options(**given)

    def set_fused_kernels(self, enabled: bool) -> None:
        impl = "triton" if enabled else "reference"
        for module in (self.generator, self.tokenizer):
            ops.use(module, impl)
        self.fused_kernels = enabled
        self._fast_samplers, self._decoders = {}, {}  # they captured the previous ops

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
            from flowtok_fast.fast_sampler import cached

            return cached(self._fast_samplers, self.generator, z_text.shape[0], opts, self.sampler_mode, self.dtype)(z_text)
        with self.autocast():
            return flow.sample(self.generator, z_text, opts.steps, opts.cfg_scale, opts.method, opts.grid, progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], fp32. Outside eager mode the decoder is compiled too (on a
        CPU with frozen weights): once the flow takes a few steps it is most of the time."""
        if self.sampler_mode == "eager":
            with self.autocast():
                return self.tokenizer.decode(latents, feats).float()
        from flowtok_fast.fast_sampler import decoder

        batch = latents.shape[0]
        if batch not in self._decoders:
            self._decoders[batch] = decoder(self.tokenizer, self.dtype, compile=True)
        return self._decoders[batch](latents, feats)

    def generator_rng(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, progress: bool = False, output: str = "pil", **options):
        """Generate one image per prompt. options: steps, cfg_scale, seed, method, grid; one not given
        (or None) takes the model's recommended value (`sampling_defaults`). output: 'pil' (list of
        PIL images) or 'tensor' ([B,3,H,W] in [0,1]). Everything is checked before any work; a
        prompt longer than CLIP's 77 tokens is truncated with a FlowTokWarning."""
        opts = self.sampling_options(**options)
        prompts = check_prompts(prompts)
        one_of(output, OUTPUT_KINDS, "output kind")
        warn_if_truncated(prompts)
        warn_if_unknown_words(prompts, self.vocabulary)
        feats = self.encode_text(prompts)
        z_text = self.text_latents(feats, self.generator_rng(opts.seed))
        images = self.decode(self.flow(z_text, opts, progress), feats)
        return to_pil(images) if output == "pil" else images


def read_recipe(directory: str, fallback: Recipe) -> Recipe:
    """The 'sampling' section of a model directory's config.json, or `fallback` when it has none."""
    section = ckpt.read_sampling(directory)
    return fallback if section is None else Recipe.from_dict(section, f"{directory}/{ckpt.CONFIG_FILE}")
