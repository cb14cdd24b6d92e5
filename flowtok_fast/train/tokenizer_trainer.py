"""Training the image tokenizer (FlowTiTok: encoder + text-guided decoder), absent from the reference.

`python -m flowtok_fast.train.tokenizer_trainer CONFIG [key=value ...]` (or under torchrun with
parallelism=ddp), or from Python: `TokenizerTrainer(cfg, dataset=...).train()` then `.export()`.

Loss = l1_weight * |x - x^| + l2_weight * (x - x^)^2 (means over pixels)
     + kl_weight * KL(q(z|x) || N(0, I)) (mean over the 77 x 16 latent elements)
     + perceptual_weight * VGG16 feature distance (only from weights on local disk).
The decoder reads the caption's CLIP features (frozen CLIP text tower) as in FlowTok; with
probability `text_drop_prob` a sample's features are replaced by those of the empty caption, so
the decoder also learns to reconstruct from the latents alone.

The machinery is the generator trainer's: batches from a data source (ShardedBatches over a
dataset, see data.py: `pixels` [B,3,H,W] in [0,1] plus `ids` or `text`, or none for "no
caption"), per-micro-batch reseeding, AdamW, fp32 EMA, atomic DCP checkpoints with exact resume,
a progress bar, metrics.jsonl, SIGTERM -> checkpoint and stop, and a stop (before the weights
change) on a non-finite loss. `export()` writes the EMA weights as a plain FlowTiTok state dict
(`model.safetensors`, the published key names) with `config.json` beside it; `load_exported`
reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast import checkpoint as ckpt
from flowtok_fast import ops
from flowtok_fast.configs import TOKEN_CHANNELS, TokenizerConfig
from flowtok_fast.errors import UserError
from flowtok_fast.models.text import ClipTextEncoder, tokenize
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.train.data import ShardedBatches, SyntheticDataset
from flowtok_fast.train.ema import EMA
from flowtok_fast.train.loop import TrainLoop
from flowtok_fast.train.parallelize import grad_sync
from flowtok_fast.train.schedule import learning_rate
from flowtok_fast.train.tokenizer_config import INITS, TokenizerTrainConfig, load_tokenizer_config  # noqa: F401 - re-exported
from flowtok_fast.train.trainer import NonFiniteLossError, distributed_run, micro_batch_seed

log = logging.getLogger(__name__)

TERMS = ("loss", "l1", "l2", "kl", "perceptual")  # the objective's outputs, total first
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"


# ---------------------------------------------------------------- init and losses


@torch.no_grad()
def init_from_scratch(tok: FlowTiTok, init: str = "fan_in", logvar: float | None = None, qk_gain: float = 1.0) -> None:
    """Re-initialise a tokenizer for training from scratch (see TokenizerTrainConfig: init,
    init_logvar, init_qk_gain)."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    if init == "fan_in":
        for m in tok.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                std = m.weight[0].numel() ** -0.5
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    if logvar is not None and tok.has_encoder:
        tok.encoder.conv_out.bias[TOKEN_CHANNELS:].fill_(logvar)
    if qk_gain != 1.0:
        blocks = list(tok.decoder.transformer) + (list(tok.encoder.transformer) if tok.has_encoder else [])
        for block in blocks:
            width = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * width].mul_(qk_gain)  # rows [q | k | v]: q and k


class VGGPerceptual(nn.Module):
    """Distance between VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3), each unit-normalised
    over channels as LPIPS does, squared difference averaged; inputs in [0, 1]. Weights come only
    from a local torchvision VGG16 state dict (full, or just its `features.*`)."""

    LAYERS = (3, 8, 15, 22)

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features[: self.LAYERS[-1] + 1]
        sd = ckpt.read_state_dict(weights)
        sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
        own = self.features.state_dict()
        ckpt.load_strict(self.features, {k: v for k, v in sd.items() if k in own}, f"VGG16 weights {weights}")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.mean) / self.std
        total = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = F.normalize(h, dim=1, eps=1e-10).chunk(2)
                total = total + (a - b).square().sum(1).mean()
        return total


def build_perceptual(weight: float, path: str | None) -> VGGPerceptual | None:
    """The perceptual net, or None (with a log message) when it is off or has no local weights."""
    if weight <= 0:
        return None
    if path and not Path(path).is_file():
        raise UserError(f"perceptual_weights={path}: file not found (expected a torchvision VGG16 state dict; "
                        "unset it or set perceptual_weight=0 to train without the perceptual loss)")
    if not path:
        log.info(
            "perceptual loss off: no local VGG16 weights (%s); set perceptual_weights to a torchvision "
            "vgg16 state dict on disk to use it (nothing is downloaded)", path or "perceptual_weights unset")
        return None
    log.info("perceptual loss on: VGG16 features from %s, weight %g", path, weight)
    return VGGPerceptual(path)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), mean over every element."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


class TokenizerObjective(nn.Module):
    """forward(pixels [B,3,H,W] in [0,1], text features [B,77,W]) -> {"loss", "l1", "l2", "kl",
    "perceptual"}. A module so DDP wraps it; the frozen perceptual net is held outside its
    parameters (it is not trained and not checkpointed)."""

    def __init__(self, tokenizer: FlowTiTok, cfg: TokenizerTrainConfig, perceptual: nn.Module | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.weights = {"l1": cfg.l1_weight, "l2": cfg.l2_weight, "kl": cfg.kl_weight,
                        "perceptual": cfg.perceptual_weight if perceptual is not None else 0.0}
        self.__dict__["perceptual"] = perceptual  # not a submodule

    def forward(self, pixels: torch.Tensor, text_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        moments = tok.encoder(pixels, tok.latent_tokens).float()  # posterior in fp32
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        recon = tok.decoder(z.to(pixels.dtype), text_feats).float()
        target = pixels.float()
        out = {
            "l1": (recon - target).abs().mean(),
            "l2": (recon - target).square().mean(),
            "kl": gaussian_kl(mean, logvar),
            "perceptual": self.perceptual(recon, target) if self.perceptual is not None else recon.new_zeros(()),
        }
        out["loss"] = sum(self.weights[k] * out[k] for k in self.weights)
        return out


# ---------------------------------------------------------------- the trainer


class TokenizerTrainer(TrainLoop):
    LOG_TERMS, BAR_TERMS, BAR_DESC = TERMS, ("loss", "l1"), "tokenizer"

    def __init__(self, cfg: TokenizerTrainConfig, device: torch.device | str | None = None, dataset=None, data=None,
                 clip: ClipTextEncoder | None = None):
        """`dataset`: len() + batch(indices) -> batch dict (split by ShardedBatches); or `data`: a
        source with next_step() / state_dict() / load_state_dict(). `clip`: the frozen text tower
        (default: built from `clip_weights`, random for tiny)."""
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if self.world_size > 1 and cfg.parallelism == "none":
            raise UserError(f"{self.world_size} processes with parallelism=none: set parallelism=ddp")
        if cfg.global_batch % (cfg.micro_batch * self.world_size):
            raise UserError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch * world_size = "
                             f"{cfg.micro_batch} * {self.world_size}")
        self.grad_accum = cfg.global_batch // (cfg.micro_batch * self.world_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.tok_cfg = cfg.tokenizer_config()

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.clip = (clip if clip is not None else self._build_clip()).to(self.device).eval().requires_grad_(False)
        if self.clip.cfg.width != self.tok_cfg.text_width:
            raise ValueError(f"CLIP width {self.clip.cfg.width} != the decoder's text width {self.tok_cfg.text_width}")
        torch.manual_seed(cfg.seed)
        self.tokenizer = FlowTiTok(self.tok_cfg, with_encoder=True)
        if cfg.init_weights:
            if not Path(cfg.init_weights).is_file():
                raise UserError(f"init_weights={cfg.init_weights}: file not found (expected a FlowTiTok weights file)")
            ckpt.load_tokenizer(self.tokenizer, cfg.init_weights)
        else:
            init_from_scratch(self.tokenizer, cfg.init, cfg.init_logvar, cfg.init_qk_gain)
        ops.use(self.tokenizer, "triton" if cfg.fused_kernels else "reference")
        self.tokenizer.to(self.device)
        self.objective = TokenizerObjective(self.tokenizer, cfg, build_perceptual(cfg.perceptual_weight, cfg.perceptual_weights))
        if self.objective.perceptual is not None:
            self.objective.perceptual.to(self.device)
        self.model = self.objective
        if cfg.parallelism == "ddp":
            if not dist.is_initialized():
                raise UserError("parallelism=ddp needs torch.distributed: launch with torchrun")
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [p for p in self.objective.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
            weight_decay=cfg.weight_decay, fused=True if cuda else None, foreach=None if cuda else True,
        )
        self.ema = EMA(self.tokenizer, cfg.ema_decay)
        with torch.no_grad():
            self.null_feats = self.clip(tokenize([""]).to(self.device))  # [1, 77, W]: "no caption"
        if data is None:
            if dataset is None:
                dataset = SyntheticDataset(cfg.data_size, "pixels", self.tok_cfg.resolution, cfg.seed, self.clip.cfg.vocab_size)
            data = ShardedBatches(dataset, cfg.global_batch, cfg.micro_batch, self.rank, self.world_size, cfg.seed)
        self.data = data
        self.step = 0
        self.history: list[dict] = []
        self.output_dir = Path(cfg.output_dir)
        self._maybe_resume()
        n_enc = sum(p.numel() for n, p in self.tokenizer.named_parameters() if not n.startswith("decoder."))
        n_dec = sum(p.numel() for p in self.tokenizer.decoder.parameters())
        self._info(
            f"tokenizer {self.tok_cfg.resolution} px, patch {self.tok_cfg.patch_size}: encoder {n_enc / 1e6:.2f}M, "
            f"decoder {n_dec / 1e6:.2f}M parameters | {self.world_size} process(es), micro-batch {cfg.micro_batch} x "
            f"accumulation {self.grad_accum} = global batch {cfg.global_batch} | "
            f"{'bf16 autocast' if self.amp_dtype else 'fp32'} on {self.device}"
        )

    def _build_clip(self) -> ClipTextEncoder:
        clip = ClipTextEncoder(self.cfg.clip_config())
        if self.cfg.clip_weights and not Path(self.cfg.clip_weights).is_file():
            raise UserError(f"clip_weights={self.cfg.clip_weights}: file not found (expected a local CLIP weights file)")
        if self.cfg.clip_weights:
            ckpt.load_clip(clip, self.cfg.clip_weights)
        elif self.cfg.model.lower() != "tiny":
            raise UserError(f"model {self.cfg.model} needs clip_weights (a local CLIP ViT-L/14-336 file); random CLIP is for tiny only")
        else:
            log.warning("CLIP text tower has random weights (tiny config)")
        return clip

    # ------------------------------------------------------------ pieces

    def lr_at(self, step: int) -> float:
        return learning_rate(step, self.cfg)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def text_features(self, batch: dict) -> torch.Tensor:
        """The decoder's guidance: CLIP features of the captions, or of the empty caption for
        samples without one and (randomly, with text_drop_prob) for dropped ones."""
        b = batch["pixels"].shape[0]
        if "ids" in batch or "text" in batch:
            ids = batch["ids"] if "ids" in batch else tokenize(list(batch["text"]))
            feats = self.clip(ids.to(self.device))
        else:
            feats = self.null_feats.expand(b, -1, -1)
        if self.cfg.text_drop_prob > 0:
            drop = torch.rand(b, device=self.device) < self.cfg.text_drop_prob
            feats = torch.where(drop[:, None, None], self.null_feats.to(feats.dtype), feats)
        return feats

    # ------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this process's micro-batches. Raises NonFiniteLossError
        (before the weights change) if any loss term is not finite."""
        lr, micro_batches = self._begin_step()
        sums = torch.zeros(len(TERMS), device=self.device)
        for m, (index, batch) in enumerate(micro_batches):
            if "pixels" not in batch:
                raise ValueError(f"tokenizer training needs 'pixels' [B,3,H,W] in every batch; got keys {sorted(batch)}")
            torch.manual_seed(micro_batch_seed(self.cfg.seed, self.step, index))
            pixels = batch["pixels"].to(self.device, non_blocking=True).float()
            with grad_sync(self.model, m == len(micro_batches) - 1):
                feats = self.text_features(batch)
                with self.autocast():
                    losses = self.model(pixels, feats)
                (losses["loss"] / self.grad_accum).backward()
            sums += torch.stack([losses[k].detach().float() for k in TERMS])
        if self.world_size > 1:
            dist.all_reduce(sums)
        values = dict(zip(TERMS, (sums / (self.grad_accum * self.world_size)).tolist()))
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.grad_clip))
        if not all(math.isfinite(v) for v in values.values()) or (grad_norm is not None and not math.isfinite(grad_norm)):
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1}: {terms}" +
                                     (f", grad_norm={grad_norm:.6g}" if grad_norm is not None else ""))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        row = {"step": self.step, "lr": lr, **values}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        return row

    # ------------------------------------------------------------ export

    def ema_tokenizer(self) -> FlowTiTok:
        """A fresh FlowTiTok (CPU, eval) holding the EMA weights."""
        tok = FlowTiTok(self.tok_cfg, with_encoder=True)
        tok.load_state_dict(self.tokenizer.state_dict())  # buffers (RoPE tables)
        self.ema.copy_to(tok)
        return tok.eval()

    def export(self, directory: str | Path | None = None, use_ema: bool = True) -> Path:
        """Write the (EMA) tokenizer as `model.safetensors` (FlowTiTok key names, loadable with
        flowtok_fast.checkpoint.load_tokenizer) + `config.json`. Rank 0 writes; returns the directory."""
        directory = Path(directory) if directory is not None else self.output_dir / "export"
        tok = self.ema_tokenizer() if use_ema else self.tokenizer
        if self.rank == 0:
            export_tokenizer(tok, directory, {"clip": dataclasses.asdict(self.clip.cfg), "step": self.step,
                                              "ema": use_ema, "train_config": self.cfg.to_dict()})
        return directory


def export_tokenizer(tok: FlowTiTok, directory: str | Path, extra: dict | None = None) -> Path:
    """Weights first, config.json last (its presence marks a complete export), both atomic."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / EXPORT_CONFIG
    if cfg_path.exists():
        cfg_path.unlink()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
    ckpt._atomic_write(directory / EXPORT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "flowtiok"}))
    payload = {"tokenizer": dataclasses.asdict(tok.cfg), **(extra or {})}
    ckpt._atomic_write(cfg_path, lambda p: Path(p).write_text(json.dumps(payload, indent=2)))
    return directory


def load_exported(directory: str | Path, with_encoder: bool = True) -> FlowTiTok:
    """A FlowTiTok from `export()`'s directory, loaded strictly (RoPE tables checked)."""
    directory = Path(directory)
    cfg_path = directory / EXPORT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete tokenizer export (no {EXPORT_CONFIG})")
    cfg = TokenizerConfig(**json.loads(cfg_path.read_text())["tokenizer"])
    tok = FlowTiTok(cfg, with_encoder=with_encoder)
    ckpt.load_tokenizer(tok, directory / EXPORT_WEIGHTS)
    return tok.eval()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="flowtok-fast train-tokenizer",
                           description="Train the FlowTiTok image tokenizer (torchrun + parallelism=ddp for several processes).")
    parser.add_argument("config", nargs="?", help="YAML config (TokenizerTrainConfig keys); omitted = defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--export", metavar="DIR", help="after training, write the EMA tokenizer here (default OUTPUT_DIR/export)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: expected an integer >= 1")
        torch.set_num_threads(args.threads)
    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        overrides, config = [config, *overrides], None
    cfg = load_tokenizer_config(config, overrides)
    if cfg.fused_kernels:  # before any model is built, as `train`
        from flowtok_fast.validate import check_fused_kernels

        check_fused_kernels("cuda" if torch.cuda.is_available() else "cpu", "fused_kernels=true")
    with distributed_run() as device:
        trainer = TokenizerTrainer(cfg, device=device)
        trainer.train()
        if trainer.stopped_by is None:  # an interrupted run resumes, it does not export half-trained
            path = trainer.export(args.export)
            if trainer.rank == 0:
                log.info(f"exported the EMA tokenizer to {path}")
    return trainer.exit_code()


if __name__ == "__main__":
    sys.exit(main())
