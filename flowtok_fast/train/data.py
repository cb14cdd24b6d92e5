"""The batch contract between data loading and the trainer, and a synthetic source for tests.

A batch is a dict with
  - text:  `ids`  [B, 77] int64 CLIP token ids (open_clip tokenizer, padding 0)
           or `text` list[str] of B captions (tokenized on the fly),
  - image: `pixels` [B, 3, H, W] float in [0, 1] (encoded by the frozen tokenizer encoder)
           or `moments` [B, 32, 1, 77] float: the tokenizer posterior, mean (channels 0..15)
           then logvar (16..31), as pretokenisation stores it.
Extra keys are ignored. A source yields, for every optimizer step, this process's micro-batches
in order and can save and restore its position, so a resumed run sees exactly the same data.
`build_source` picks the source named by the config: synthetic (below), webdataset and
pretokenized shards (webdata.py), or DALI (dali_pipeline.py).
"""
from __future__ import annotations

import torch

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS

SOT, EOT = 49406, 49407  # CLIP start / end of text


def validate_batch(batch: dict) -> int:
    """Check the contract; returns the batch size."""
    if not isinstance(batch, dict):
        raise TypeError(f"a batch must be a dict, got {type(batch).__name__}")
    if ("ids" in batch) == ("text" in batch):
        raise ValueError(f"a batch needs exactly one of 'ids' [B,{NUM_TOKENS}] or 'text' list[str]; got keys {sorted(batch)}")
    if ("pixels" in batch) == ("moments" in batch):
        raise ValueError(f"a batch needs exactly one of 'pixels' [B,3,H,W] or 'moments' [B,32,1,{NUM_TOKENS}]; got keys {sorted(batch)}")
    if "ids" in batch:
        ids = batch["ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[1] != NUM_TOKENS:
            raise ValueError(f"'ids' must be an int64 tensor [B, {NUM_TOKENS}], got {_describe(ids)}")
        b = ids.shape[0]
    else:
        text = batch["text"]
        if not isinstance(text, (list, tuple)) or not all(isinstance(s, str) for s in text):
            raise ValueError(f"'text' must be a list of strings, got {type(text).__name__}")
        b = len(text)
    if "pixels" in batch:
        x = batch["pixels"]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[:2] != (b, 3):
            raise ValueError(f"'pixels' must be a float tensor [{b}, 3, H, W] in [0, 1], got {_describe(x)}")
    else:
        m = batch["moments"]
        if not isinstance(m, torch.Tensor) or not m.is_floating_point() or m.shape != (b, 2 * TOKEN_CHANNELS, 1, NUM_TOKENS):
            raise ValueError(f"'moments' must be a float tensor [{b}, {2 * TOKEN_CHANNELS}, 1, {NUM_TOKENS}], got {_describe(m)}")
    if b == 0:
        raise ValueError("empty batch")
    return b


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class SyntheticDataset:
    """Deterministic random samples: item i depends only on (seed, i). Captions are 1..20 random
    token ids between start/end tokens; moments are random means with logvar -6; pixels uniform."""

    def __init__(self, size: int, kind: str = "moments", resolution: int = 64, seed: int = 0, vocab_size: int = 49408):
        if kind not in ("moments", "pixels"):
            raise ValueError(f"kind must be 'moments' or 'pixels', got {kind!r}")
        self.size, self.kind, self.resolution, self.seed, self.vocab_size = size, kind, resolution, seed, vocab_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n = int(torch.randint(1, 21, (), generator=g))
        ids = torch.zeros(NUM_TOKENS, dtype=torch.int64)
        ids[0], ids[n + 1] = SOT, EOT
        ids[1 : n + 1] = torch.randint(1, min(self.vocab_size, SOT), (n,), generator=g)
        if self.kind == "pixels":
            return {"ids": ids, "pixels": torch.rand(3, self.resolution, self.resolution, generator=g)}
        mean = torch.randn(TOKEN_CHANNELS, 1, NUM_TOKENS, generator=g)
        return {"ids": ids, "moments": torch.cat([mean, torch.full_like(mean, -6.0)])}

    def batch(self, indices: list[int]) -> dict:
        items = [self[i] for i in indices]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ShardedBatches:
    """Global batches from a shuffled epoch, split into micro-batches across processes.

    Step s takes the next `global_batch` indices of the epoch's permutation (seeded by the epoch;
    an incomplete tail is dropped) and cuts them into world_size * grad_accum micro-batches;
    micro-batch m of rank r is global micro-batch r * grad_accum + m. So one process with
    grad_accum = k sees exactly the data that k processes see with grad_accum = 1.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch * world_size = {micro_batch * world_size}")
        if len(dataset) < global_batch:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch ({global_batch})")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.epoch, self.offset = 0, 0

    def _perm(self) -> torch.Tensor:
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))

    def next_step(self) -> list[tuple[int, dict]]:
        """[(global micro-batch index, batch)] for this rank, grad_accum of them."""
        if self.offset + self.global_batch > len(self.dataset):
            self.epoch, self.offset = self.epoch + 1, 0
        indices = self._perm()[self.offset : self.offset + self.global_batch].tolist()
        self.offset += self.global_batch
        out = []
        for m in range(self.grad_accum):
            g = self.rank * self.grad_accum + m
            out.append((g, self.dataset.batch(indices[g * self.micro_batch : (g + 1) * self.micro_batch])))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def build_source(cfg, model_cfg, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
    """The data source of a TrainConfig: an object with grad_accum, next_step(), state_dict() and
    load_state_dict() (see ShardedBatches)."""
    device = torch.device(device)
    args = dict(global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, rank=rank, world_size=world_size, seed=cfg.seed)
    if cfg.data_source == "synthetic":
        if cfg.data_size < cfg.global_batch:
            from flowtok_fast.errors import UserError

            raise UserError(f"data_size={cfg.data_size}: expected at least one global batch (global_batch={cfg.global_batch})")
        dataset = SyntheticDataset(cfg.data_size, cfg.data_kind, model_cfg.tokenizer.resolution, cfg.seed, model_cfg.clip.vocab_size)
        return ShardedBatches(dataset, **args)
    if cfg.data_source in ("webdataset", "pretokenized"):
        from flowtok_fast.train.webdata import WebDatasetSource

        kind = "moments" if cfg.data_source == "pretokenized" else "pixels"
        return WebDatasetSource(cfg.data_path, kind, resolution=model_cfg.tokenizer.resolution, num_workers=cfg.data_workers,
                                index_dir=cfg.data_index_dir, pin_memory=device.type == "cuda", progress=cfg.progress, **args)
    if cfg.data_source == "dali":
        from flowtok_fast.train.dali_pipeline import DaliSource

        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
        return DaliSource(cfg.data_path, resolution=model_cfg.tokenizer.resolution, device_id=device_id,
                          num_threads=max(1, cfg.data_workers), index_dir=cfg.data_index_dir, progress=cfg.progress, **args)
    raise ValueError(f"unknown data_source {cfg.data_source!r}")
