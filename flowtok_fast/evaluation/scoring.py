"""Per-shard scores kept beside the shard (`shard-00003.scores.npz`: Inception features and
CLIP scores, plus which weight files made them), written atomically right after the shard is
generated. A resumed run reuses them; a missing or stale one is recomputed from the shard."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from flowtok_fast.evaluation import shards as sh


def file_fingerprint(path: str | None) -> str:
    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class ShardScorer:
    def __init__(self, folder: str, fmt: str, inception, prompts: list[str], clip=None):
        self.folder, self.fmt, self.inception, self.clip, self.prompts = folder, fmt, inception, clip, prompts
        self.key = f"inception={file_fingerprint(inception.path)};clip={file_fingerprint(getattr(clip, 'path', None)) if clip else ''}"

    def path(self, shard: sh.Shard) -> str:
        return sh.shard_path(self.folder, shard, "png") + ".scores.npz"

    def is_current(self, shard: sh.Shard) -> bool:
        try:
            with np.load(self.path(shard)) as z:
                return str(z["key"]) == self.key
        except (OSError, KeyError, ValueError):
            return False

    def __call__(self, shard: sh.Shard, images) -> None:
        arrays = {"inception": self.inception(images), "key": np.array(self.key)}
        if self.clip is not None:
            arrays["clip"] = self.clip(images, self.prompts[shard.start:shard.stop])
        final = self.path(shard)
        tmp = f"{final[:-4]}{sh.TMP_MARK}{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, final)

    def ensure(self, shards: list[sh.Shard]) -> int:
        """Scores for finished shards that lack current ones (a run killed between the two). Returns how many."""
        stale = [s for s in shards if sh.is_done(self.folder, s, self.fmt) and not self.is_current(s)]
        for s in stale:
            self(s, sh.read_shard(self.folder, s, self.fmt))
        return len(stale)

    def load(self, shards: list[sh.Shard]) -> dict:
        feats, clip = [], []
        for s in shards:
            with np.load(self.path(s)) as z:
                feats.append(z["inception"])
                if "clip" in z.files:
                    clip.append(z["clip"])
        return {"inception": np.concatenate(feats), "clip": np.concatenate(clip) if clip else None}
