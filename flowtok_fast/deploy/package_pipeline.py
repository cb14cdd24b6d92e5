"""PackagePipeline: text-to-image from an exported package, with no compilation at start-up.

    pipe = PackagePipeline.load("pkg/")           # checks manifest, files, torch, device
    images = pipe(["a red bicycle"], seed=0)       # list of PIL images, as FlowTokPipeline

The same seed gives the same noise as FlowTokPipeline: one torch.Generator on the package's
device, seeded, draws [n, 77, 16] for the n prompts. Fewer prompts than the package's batch are
padded with empty prompts and zero noise, and the padding is dropped; more are run in batches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.deploy import manifest as mf
from flowtok_fast.deploy.dtype import DTYPES, dtype_name
from flowtok_fast.errors import UserError


def _load_program(path: Path):
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # a file that passed the size/hash checks but still does not load
        raise UserError(f"{path}: cannot be loaded as an AOTInductor package ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): export it again") from None


class PackagePipeline:
    def __init__(self, directory: Path, manifest: dict, programs: dict, device: torch.device):
        self.directory, self.manifest, self.device = directory, manifest, device
        self.text, self.flow_program, self.decode_program = programs["text"], programs["flow"], programs["decode"]
        self.batch = manifest["batch"]
        self.dtype = DTYPES[manifest["dtype"]]
        self.times = [torch.full((manifest["flow_rows"],), t, dtype=torch.float32, device=device)
                      for t in manifest["flow_times"]]

    @classmethod
    def load(cls, directory: str | Path, *, batch: int | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype | str | None = None, model=None) -> "PackagePipeline":
        """Refuses (UserError, one line) a package built for another batch / device / dtype / model
        (each checked only when given), or with another torch, or whose files are damaged.
        `model`: a FlowTokPipeline whose weights the package must come from (from a model directory:
        flowtok_fast.loading.load_package)."""
        directory = Path(directory)
        manifest = mf.read(directory)
        mf.expect(manifest, "batch", batch)
        if isinstance(dtype, torch.dtype):
            dtype = dtype_name(dtype)
        mf.expect(manifest, "dtype", dtype)
        device = torch.device(device) if device is not None else torch.device(manifest["device"])
        mf.check_runtime(manifest, device)
        if model is not None:
            _check_model(manifest, model)
        mf.check_files(directory, manifest)
        programs = {stage: _load_program(directory / manifest["files"][stage]["name"]) for stage in mf.STAGES}
        return cls(directory, manifest, programs, device)

    OPTION_FIELDS = {"steps": "steps", "cfg_scale": "cfg_scale", "method": "sampler", "grid": "grid"}

    def check_options(self, **options) -> None:
        """Sampling options are baked into the package: a different value is refused, saying so."""
        unknown = sorted(set(options) - set(self.OPTION_FIELDS))
        if unknown:
            raise UserError(f"unknown sampling option(s) {unknown}: expected some of {list(self.OPTION_FIELDS)}")
        for name, value in options.items():
            built = self.manifest[self.OPTION_FIELDS[name]]
            if value is not None and value != built:
                raise UserError(f"package {str(self.directory)!r} was built for {name} {built!r}, asked for {value!r}: "
                                f"export one with that setting (or leave it out)")

    # ------------------------------------------------------------ stages (one package batch each)

    def run_batch(self, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """ids [batch, 77] int64 and noise [batch, 77, 16] fp32 -> images [batch, 3, H, W] in [0, 1]."""
        feats, z = self.text(ids, noise)
        return self.decode_program(self.flow(z), feats)

    def flow(self, z_text: torch.Tensor) -> torch.Tensor:
        """Text latents [batch, 77, 16] -> image latents: the N guided Euler steps."""
        if self.manifest["flow_mode"] == "loop":
            return self.flow_program(z_text)
        x = z_text
        for t in self.times:
            x = self.flow_program(x, t)
        return x

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, seed: int = 0, output: str = "pil", ids: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, progress: bool = False, **options):
        """One image per prompt (or per row of `ids` [n, 77]; `noise` [n, 77, 16] replaces the seeded
        noise). output: 'pil' or 'tensor' ([n,3,H,W] in [0,1]). options (steps, cfg_scale, method,
        grid), as FlowTokPipeline takes them: None or the package's value, else a UserError."""
        self.check_options(**options)
        from flowtok_fast.models.text import tokenize
        from flowtok_fast.images import to_pil
        from flowtok_fast.prompt_checks import warn_if_truncated
        from flowtok_fast.validate import check_prompts, nonneg_int, one_of

        one_of(output, ("pil", "tensor"), "output kind")
        nonneg_int(seed, "seed")
        if ids is None:
            prompts = check_prompts(prompts)
            warn_if_truncated(prompts)
            ids = tokenize(prompts)
        n = ids.shape[0]
        if noise is None:  # as FlowTokPipeline.text_latents: one generator, [n, 77, 16]
            gen = torch.Generator(self.device).manual_seed(seed)
            noise = torch.randn((n, NUM_TOKENS, TOKEN_CHANNELS), generator=gen, device=self.device)
        ids, noise = ids.to(self.device), noise.to(self.device, torch.float32)
        images = []
        for i in range(0, n, self.batch):
            chunk_ids, chunk_noise = ids[i: i + self.batch], noise[i: i + self.batch]
            real = chunk_ids.shape[0]
            pad = self.batch - real
            if pad:  # static shapes: fill the batch, drop the extra rows below
                chunk_ids = torch.cat([chunk_ids, tokenize([""] * pad).to(self.device)])
                chunk_noise = torch.cat([chunk_noise, chunk_noise.new_zeros(pad, NUM_TOKENS, TOKEN_CHANNELS)])
            images.append(self.run_batch(chunk_ids, chunk_noise)[:real])
        images = torch.cat(images)
        return to_pil(images) if output == "pil" else images


def _check_model(manifest: dict, model) -> None:
    """`model`: a FlowTokPipeline (loading.load_package turns a model directory into one)."""
    digest = mf.weights_hash(model.clip, model.generator, model.tokenizer)
    built = manifest["model"]
    if digest != built["weights_sha256"]:
        raise UserError(f"package built for another model ({built['name']}, weights sha256 {built['weights_sha256'][:12]}), "
                        f"expected this one ({model.config.name}, {digest[:12]}): export it from this model")
