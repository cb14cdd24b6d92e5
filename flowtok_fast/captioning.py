"""Image-to-text end to end: image -> tokenizer encoder -> reverse flow -> text decoder -> captions.

The paper's reverse direction: the same generator architecture, trained with the image latents
at t = 0 and the text latents Z_T at t = 1 (KL and alignment weights 0), then a
non-autoregressive text decoder maps Z_T to CLIP token ids at all 77 positions.
"""
from __future__ import annotations

import contextlib
import os

import torch
from PIL import Image

from flowtok_fast import checkpoint as ckpt
from flowtok_fast import flow, ops
from flowtok_fast.configs import FlowTokConfig, get_config
from flowtok_fast.errors import UserError
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import TextDecoder, detokenize
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.deploy.dtype import auto_dtype
from flowtok_fast.pipeline import read_recipe, resolve_device
from flowtok_fast.sampling import PAPER_I2T, Recipe, SamplingOptions
from flowtok_fast.validate import check_image, one_of

COMPONENTS = ("generator", "tokenizer", "text_decoder")
BUILD_ORDER = ("tokenizer", "generator", "text_decoder")  # the order of build()'s modules
def load_image(path: str, resolution: int) -> torch.Tensor:
    """A file -> [3, r, r] in [0, 1]: checked (check_image), short side resized to r, centre crop
    (as in training). Any failure is a UserError naming the file."""
    check_image(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - truncated data is found only when decoding
        raise UserError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") from None
    s = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def load_images(paths: list[str], resolution: int) -> torch.Tensor:
    """Files -> [B, 3, r, r] in [0, 1]; a UserError names the first file that cannot be used."""
    return torch.stack([load_image(p, resolution) for p in paths])


def check_pixels(pixels, resolution: int) -> torch.Tensor:
    """The tensor form of the input: floats in [0, 1], [B, 3, r, r]."""
    if not isinstance(pixels, torch.Tensor):
        raise UserError(f"images must be a [B, 3, {resolution}, {resolution}] tensor or a list of file paths, "
                        f"got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise UserError(f"pixels must be floats in [0, 1], got {pixels.dtype} (divide uint8 images by 255)")
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, resolution, resolution) or pixels.shape[0] == 0:
        raise UserError(f"pixels must have shape [B, 3, {resolution}, {resolution}] with B >= 1, got {tuple(pixels.shape)}")
    if not torch.isfinite(pixels).all():
        raise UserError("pixels must be finite floats in [0, 1], got NaN or inf")
    lo, hi = pixels.min().item(), pixels.max().item()
    if lo < 0.0 or hi > 1.0:
        hint = " (0-255 values? divide by 255)" if hi > 1.5 else ""
        raise UserError(f"pixels must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return pixels


class FlowTokCaptioner:
    def __init__(self, config: FlowTokConfig, tokenizer: FlowTiTok, generator: FlowTokGenerator,
                 text_decoder: TextDecoder, device=None, dtype=None, fused_kernels: bool = False,
                 sampler_mode: str = "eager"):
        if not tokenizer.has_encoder:
            raise UserError("captioning needs the image tokenizer's encoder")
        self.config = config
        self.device = resolve_device(device)
        self.dtype = dtype or auto_dtype(self.device)
        self.sampling: Recipe = PAPER_I2T  # how this model wants to be sampled (a model directory says)
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.text_decoder = text_decoder.to(self.device).eval().requires_grad_(False)
        for module in (self.tokenizer, self.generator):
            ops.use(module, "triton" if fused_kernels else "reference")
        # "eager": flow.sample; else the static sampler of fast_sampler.py (as FlowTokPipeline.flow),
        # built once per (batch, steps, scale, grid)
        from flowtok_fast.fast_sampler import MODES

        one_of(sampler_mode, MODES, "sampler mode")
        self.sampler_mode, self._fast_samplers = sampler_mode, {}

    @staticmethod
    def build(config: FlowTokConfig):
        return (FlowTiTok(config.tokenizer), FlowTokGenerator(config.generator, config.text_vae),
                TextDecoder(config.text_vae, config.clip.vocab_size))

    @classmethod
    def random(cls, config: FlowTokConfig | str = "tiny", seed: int = 0, flowing: bool = False,
               **kw) -> "FlowTokCaptioner":
        """Random weights: captions are gibberish by design (tests, demos). flowing: DiT's
        zero-initialised layers drawn too (from seed + 1), else the flow does not move at all."""
        from flowtok_fast.untrained import make_flow_move

        config = get_config(config) if isinstance(config, str) else config
        torch.manual_seed(seed)
        captioner = cls(config, *cls.build(config), **kw)
        if flowing:
            make_flow_move(captioner.generator, seed + 1)
        return captioner

    @classmethod
    def from_pretrained(cls, directory: str, **kw) -> "FlowTokCaptioner":
        config, parts = ckpt.read_pretrained(directory)
        missing = [c for c in COMPONENTS if c not in parts]
        if missing:
            raise ckpt.CheckpointError(f"{directory} lacks component(s) {missing} needed for image-to-text")
        modules = cls.build(config)
        parts["tokenizer"] = ckpt.tokenizer_state_dict(parts["tokenizer"])
        ckpt.check_tokenizer_tables(parts["tokenizer"], config.tokenizer, f"{directory} [tokenizer]")
        for name, module in zip(BUILD_ORDER, modules):
            ckpt.load_strict(module, parts[name], f"{directory} [{name}]")
        captioner = cls(config, *modules, **kw)
        captioner.sampling = read_recipe(directory, PAPER_I2T)
        return captioner

    def save_pretrained(self, directory: str, storage_dtype: str = "float32", vocab_rows=None) -> None:
        """storage_dtype / vocab_rows: a smaller file (flowtok_fast/compact_storage.py)."""
        ckpt.save_pretrained(directory, self.config, dict(zip(BUILD_ORDER, (self.tokenizer, self.generator, self.text_decoder))),
                             storage_dtype, vocab_rows, self.sampling.to_dict())

    @property
    def sampling_defaults(self) -> dict:
        """The options a call without them uses: the model's recommendation (steps, cfg_scale, method, grid)."""
        return self.sampling.defaults

    def sampling_options(self, **given) -> SamplingOptions:
        """`given` (steps, cfg_scale, method, grid; None = not given) completed from the model's recommendation."""
        return self.sampling.options(**given)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def image_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior MEAN (deterministic captions) in flow space, [B, 77, 16]."""
        with self.autocast():
            return self.tokenizer.encode(pixels.to(self.device), sample=False)

    @torch.no_grad()
    def text_latents(self, z_img: torch.Tensor, opts: SamplingOptions, progress: bool = False) -> torch.Tensor:
        if self.sampler_mode != "eager" and opts.method == "euler":
            from flowtok_fast.fast_sampler import cached

            return cached(self._fast_samplers, self.generator, z_img.shape[0], opts, self.sampler_mode, self.dtype)(z_img)
        with self.autocast():
            return flow.sample(self.generator, z_img, opts.steps, opts.cfg_scale, opts.method, opts.grid, progress)

    @torch.no_grad()
    def decode_ids(self, z_text: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.text_decoder.decode_ids(z_text)

    @torch.no_grad()
    def __call__(self, images, steps: int | None = None, cfg_scale: float | None = None, method: str | None = None,
                 grid: str | None = None, progress: bool = False) -> list[str]:
        """images: a [B,3,r,r] float tensor in [0,1] or a list of file paths. One caption per image.
        An option not given (None) takes the model's recommended value (`sampling_defaults`).
        Options and images are checked before any work (a bad file is named)."""
        opts = self.sampling_options(steps=steps, cfg_scale=cfg_scale, method=method, grid=grid)
        resolution = self.config.tokenizer.resolution
        if isinstance(images, (list, tuple)):
            if not images or not all(isinstance(p, (str, os.PathLike)) for p in images):
                raise UserError("images must be a non-empty list of file paths or a [B, 3, r, r] tensor")
            images = load_images([os.fspath(p) for p in images], resolution)
        check_pixels(images, resolution)
        ids = self.decode_ids(self.text_latents(self.image_latents(images), opts, progress))
        return detokenize(ids.cpu())
