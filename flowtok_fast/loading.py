"""Loading a model from any source, in one place below the CLI, the server and deploy/.

Sources: a flowtok-fast model directory, the published files (generator + tokenizer + CLIP),
random weights (tests, install checks), or an exported AOTInductor package. Each loader checks
what it is given and names the problem (UserError / CheckpointError) before building anything.
"""
from __future__ import annotations

from pathlib import Path

from flowtok_fast.errors import UserError

NO_WEIGHTS = ("no weights given: pass --model-dir DIR, or --checkpoint FlowTok-XL.pth --tokenizer FlowTiTok_512.bin "
              "--clip ViT-L-14-336.pt (local files; nothing is downloaded), or --random-weights to check the install "
              "with random weights")


def load_text_to_image(model_dir: str | None = None, checkpoint: str | None = None, tokenizer: str | None = None,
                       clip: str | None = None, random_config=None, resolution: int = 256, **kw):
    """A FlowTokPipeline from exactly one source: `model_dir`, the three official files, or
    `random_config` (a config or its name: untrained weights). `kw` goes to the pipeline
    (device, dtype, fused_kernels, sampler_mode)."""
    from flowtok_fast.configs import get_config
    from flowtok_fast.pipeline import FlowTokPipeline

    if model_dir:
        return FlowTokPipeline.from_pretrained(model_dir, **kw)
    official = (checkpoint, tokenizer, clip)
    if any(official):
        if not all(official):
            raise UserError("--checkpoint, --tokenizer and --clip must be given together (or use --model-dir)")
        return FlowTokPipeline.from_official(*official, **kw)
    if random_config is None:
        raise UserError(NO_WEIGHTS)
    cfg = get_config(random_config, resolution) if isinstance(random_config, str) else random_config
    return FlowTokPipeline.random(cfg, flowing=True, **kw)  # untrained, but its flow moves (untrained.py)


def load_package(directory: str | Path, *, model=None, **expect):
    """An exported package (`flowtok-fast export`) as a PackagePipeline, called like a
    FlowTokPipeline (prompts, seed, output; steps / cfg_scale / method / grid must be the
    package's). `expect`: batch=, device=, dtype=; `model`: a pipeline or a model directory whose
    weights the package must come from."""
    from flowtok_fast.deploy.package_pipeline import PackagePipeline

    if isinstance(model, (str, Path)):
        from flowtok_fast.pipeline import FlowTokPipeline

        model = FlowTokPipeline.from_pretrained(str(model), device="cpu")
    return PackagePipeline.load(directory, model=model, **expect)
