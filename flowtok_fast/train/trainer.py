"""The generator trainer (the loop around train_step, and checkpoints, are loop.py's).

One optimizer step = `grad_accum` micro-batches per process, `global_batch` samples in all.
Weights and optimizer state are fp32 (master weights); compute is bf16 autocast on CUDA and fp32
on CPU. Every micro-batch reseeds torch's generators from (seed, step, global micro-batch index),
so the randomness of a sample (t, noise, CFG selection, dropout) does not depend on the number of
processes or on where a run was resumed: 2 processes x 1 micro-batch equal 1 process x 2, and a
resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flowtok_fast.errors import UserError
from flowtok_fast.models.generator import FlowTokGenerator
from flowtok_fast.models.text import TextDecoder
from flowtok_fast.objective import LOSS_TERMS, FlowTokObjective
from flowtok_fast.train.config import TrainConfig
from flowtok_fast.train.data import ShardedBatches, build_source
from flowtok_fast.train.ema import EMA
from flowtok_fast.train.frozen import build_frozen, caption_ids
from flowtok_fast.train.loop import TrainLoop
from flowtok_fast.train.parallelize import grad_sync, parallelize


class NonFiniteLossError(RuntimeError):
    pass


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro_index]).generate_state(1, np.uint64)[0])


def process_setup(cfg, device) -> tuple[int, int, torch.device, torch.dtype | None]:
    """(rank, world size, device, autocast dtype or None) of this process for a run config with
    `parallelism` and `precision` (auto = bf16 autocast on CUDA, fp32 on CPU)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1 and cfg.parallelism == "none":
        raise UserError(f"{world_size} processes with parallelism=none: set parallelism=ddp or fsdp")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return rank, world_size, device, torch.bfloat16 if bf16 else None


class Trainer(TrainLoop):
    LOG_TERMS = LOSS_TERMS

    def __init__(self, cfg: TrainConfig, device: torch.device | str | None = None, dataset=None):
        self.cfg = cfg
        self.rank, self.world_size, self.device, self.amp_dtype = process_setup(cfg, device)
        self.grad_accum = cfg.grad_accum(self.world_size)

        model_cfg = cfg.model_config()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.frozen = build_frozen(model_cfg, cfg.clip_weights, cfg.tokenizer_weights, cfg.data_kind == "pixels",
                                   cfg.latent_sampling).to(self.device)
        torch.manual_seed(cfg.seed)
        generator = FlowTokGenerator(model_cfg.generator, model_cfg.text_vae)
        decoder = None
        if cfg.direction == "i2t" and cfg.text_decoder:
            decoder = TextDecoder(model_cfg.text_vae, model_cfg.clip.vocab_size)
        self.objective = FlowTokObjective(generator, cfg.loss_weights(), cfg.direction, decoder, cfg.t_sampling,
                                          cfg.t_logit_loc, cfg.t_logit_scale).to(self.device)
        self.model = parallelize(
            self.objective, cfg.parallelism, self.device,
            cfg.fused_kernels, cfg.recompute, cfg.compile_blocks,
        )
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [p for p in self.objective.parameters() if p.requires_grad],
            lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
            fused=True if cuda else None, foreach=None if cuda else True,
        )
        self.ema = EMA(generator, cfg.ema_decay)
        if dataset is None:  # the configured source: synthetic, webdataset, dali or pretokenized shards
            self.data = build_source(cfg, model_cfg, self.rank, self.world_size, self.device)
        else:
            self.data = ShardedBatches(dataset, cfg.global_batch, cfg.micro_batch, self.rank, self.world_size, cfg.seed)
        self.step = 0  # optimizer steps completed
        self.history: list[dict] = []  # this run's per-step metrics
        self.output_dir = Path(cfg.output_dir)
        self._maybe_resume()
        n_params = sum(p.numel() for p in generator.parameters())
        self._info(
            f"model {model_cfg.name}: {n_params / 1e6:.1f}M parameters | {self.world_size} process(es), "
            f"{cfg.parallelism}, micro-batch {cfg.micro_batch} x accumulation {self.grad_accum} = global batch "
            f"{cfg.global_batch} | {'bf16 autocast' if self.amp_dtype else 'fp32'} on {self.device}"
        )

    # ------------------------------------------------------------ pieces

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then constant."""
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # ------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        """Forward/backward of this process's micro-batches, then one optimizer and EMA update.
        Raises NonFiniteLossError (before touching the weights) if any loss term is not finite."""
        lr, micro_batches = self._begin_step()
        sums = torch.zeros(len(LOSS_TERMS), device=self.device)
        for m, (index, batch) in enumerate(micro_batches):
            torch.manual_seed(micro_batch_seed(self.cfg.seed, self.step, index))
            with grad_sync(self.model, m == len(micro_batches) - 1):
                with self.autocast():
                    feats, z_img = self.frozen(batch, self.device)
                    ids = caption_ids(batch) if self.objective.text_decoder is not None else None
                    losses = self.model(feats, z_img, ids)
                (losses["loss"] / self.grad_accum).backward()
            sums += torch.stack([losses[k].detach().float() for k in LOSS_TERMS])
        if self.world_size > 1:
            dist.all_reduce(sums)
        values = dict(zip(LOSS_TERMS, (sums / (self.grad_accum * self.world_size)).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1}: {terms}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        return {"step": self.step, "lr": lr, **values}


def setup_distributed() -> torch.device:
    """Under torchrun (WORLD_SIZE set): init the process group (NCCL on CUDA, gloo on CPU) and
    return this process's device; otherwise just the default device."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


@contextlib.contextmanager
def distributed_run():
    """For a CLI entry point: logging on, the process group up (under torchrun) for the block and
    torn down after it even on error, so a failed rank does not leave the others hanging.
    Yields this process's device."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = setup_distributed()
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
