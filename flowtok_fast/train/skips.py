"""Counting the samples a data source skips (corrupt images, missing captions, empty shards):
logged as they grow, saved with each checkpoint and restored on resume, printed at the end of a run."""
from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("flowtok_fast.train.webdata")  # where these messages have always come from


class SkipLog:
    """Counts skipped samples by reason and logs the totals when they grow (at most every
    `interval` seconds, and always on the first skip). `counts` = found while listing the shards
    (recomputed by every run) + found in the batches consumed (`from_batches`, saved with the
    checkpoints: see state_dict)."""

    def __init__(self, what: str, interval: float = 60.0):
        self.what, self.interval = what, interval
        self.counts: Counter = Counter()
        self.from_batches: Counter = Counter()
        self._logged_total, self._logged_at = 0, None

    def add(self, counts) -> None:
        counts = {k: v for k, v in dict(counts).items() if v}
        self.counts.update(counts)
        self.from_batches.update(counts)
        self.maybe_log()

    def _detail(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))

    def maybe_log(self, force: bool = False) -> None:
        total = sum(self.counts.values())
        now = time.monotonic()
        if total > self._logged_total and (force or self._logged_at is None or now - self._logged_at >= self.interval):
            log.warning("%s: skipped so far: %s", self.what, self._detail())
            self._logged_total, self._logged_at = total, now

    def log_total(self) -> None:
        """The final counts, at the end of a run (the periodic log may be up to `interval` old)."""
        if self.counts:
            log.warning("%s: skipped in total: %s", self.what, self._detail())
        else:
            log.info("%s: no sample or shard skipped", self.what)
        self._logged_total, self._logged_at = sum(self.counts.values()), time.monotonic()

    def state_dict(self) -> dict:
        return {"total": dict(self.counts), "from_batches": dict(self.from_batches)}

    def load_state_dict(self, state: dict) -> None:
        """Add the batch-time counts of the run being resumed (the listing counts are this run's)."""
        saved = Counter({str(k): int(v) for k, v in dict(state.get("from_batches", {})).items()})
        self.counts.subtract(self.from_batches)
        self.counts.update(saved)
        self.counts = +self.counts  # drop zero entries
        self.from_batches = saved
