"""The request queue and its single model thread.

Jobs with the same key (kind, steps, cfg, sampler, grid) can share a batch, padded to the smallest
bucket that holds it (the engine drops the padding rows). When a group runs adapts to the arrivals:
when a key's batch finishes, the rows it answered plus the rows of that key still waiting are the
rows expected for its next batch (closed-loop clients resend once answered; an open stream at rate r
brings about r x batch time), so a group runs as soon as it holds that many rows (or the largest
bucket), or once its oldest job has waited one batch time. With no batch of the key in the last
batch time, the plain `max_wait_s` window applies. At concurrency 1 the expected count is 1: no wait.

The queue is bounded in rows: a job larger than the whole queue can never run (TooLarge -> 413); one
that would overflow it now is refused with the time the queue takes to drain at its measured rate
(QueueFull -> 429 with Retry-After). A job whose client gave up (timeout, disconnect) is removed if it
has not started. All model work happens on one thread, so the event loop never waits on it; results
return through `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from dataclasses import dataclass, field

from flowtok_fast.pipeline import SamplingOptions


class QueueFull(Exception):
    """The queue holds too many rows to take this job now; `retry_after_s`: when it will have drained."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(Exception):
    """The job has more rows than the whole queue: it can never be taken."""


@dataclass
class LastBatch:
    expected: int  # rows it answered + rows of its key waiting when it finished
    finished: float  # time.monotonic()
    seconds: float  # its wall time


@dataclass(eq=False)
class Job:
    kind: str  # "images" | "captions"
    items: list  # engine.Row for images, [3, r, r] tensors for captions
    opts: SamplingOptions
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    @property
    def key(self) -> tuple:
        o = self.opts
        return (self.kind, o.steps, o.cfg_scale, o.method, o.grid)


class Batcher:
    def __init__(self, engine, buckets: list[int], max_wait_s: float, max_queue: int, metrics):
        self.engine, self.buckets = engine, sorted(buckets)
        self.max_wait_s, self.max_queue, self.metrics = max_wait_s, max_queue, metrics
        self._pending: list[Job] = []
        self._last: dict[tuple, LastBatch] = {}  # per key: its previous batch (the adaptive window)
        self._rows_per_s: float | None = None  # measured drain rate (moving average), for Retry-After
        self._running = 0  # jobs taken by the worker and not yet answered
        self._running_rows = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="flowtok-serve-model", daemon=True)

    @property
    def largest(self) -> int:
        return self.buckets[-1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- event-loop side

    def submit(self, job: Job) -> None:
        if len(job.items) > self.max_queue:
            raise TooLarge(f"{len(job.items)} rows: expected at most {self.max_queue}, the whole queue (--max-queue)")
        with self._cond:
            queued = sum(len(j.items) for j in self._pending)
            if queued + len(job.items) > self.max_queue:
                raise QueueFull(f"the queue holds {queued} of {self.max_queue} images", self.retry_after_s(queued))
            self._pending.append(job)
            self.metrics.queue_depth.set(queued + len(job.items))
            self._cond.notify_all()

    def cancel(self, job: Job) -> bool:
        """Drops a job that has not started; True if it was still queued."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self._set_depth()
                return True
            return False

    def retry_after_s(self, queued: int) -> int:
        """Seconds the queue takes to drain at its measured rate (1 before any batch has run)."""
        rate = self._rows_per_s
        return 1 if not rate else max(1, min(3600, math.ceil((queued + self._running_rows) / rate)))

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and self._running == 0

    # ---------------------------------------------------------------- worker side

    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(sum(len(j.items) for j in self._pending))

    def _deadline(self, jobs: list[Job]) -> tuple[int, float]:
        """(rows expected, when to run anyway) for a group of one key: see the module docstring. The
        wait counts from when the key's previous batch finished: jobs that came in while it ran
        have not been waiting on the window."""
        last = self._last.get(jobs[0].key)
        if last is not None and time.monotonic() - last.finished <= max(last.seconds, self.max_wait_s):
            return min(last.expected, self.largest), max(jobs[0].enqueued, last.finished) + max(last.seconds, self.max_wait_s)
        return self.largest, jobs[0].enqueued + self.max_wait_s

    def _groups(self) -> list[list[Job]]:
        groups: dict[tuple, list[Job]] = {}
        for job in self._pending:
            groups.setdefault(job.key, []).append(job)
        return sorted(groups.values(), key=lambda js: js[0].enqueued)

    def _next_group(self) -> list[Job] | None:
        """The group to run now (oldest ready key first), or None; called under the lock."""
        now = time.monotonic()
        for jobs in self._groups():
            expected, deadline = self._deadline(jobs)
            if sum(len(j.items) for j in jobs) >= expected or now >= deadline:
                taken, rows = [], 0
                for j in jobs:  # FIFO, whole jobs, up to the largest bucket
                    if rows + len(j.items) > self.largest:
                        break
                    taken.append(j)
                    rows += len(j.items)
                return taken
        return None

    def _wait_time(self) -> float | None:
        if not self._pending:
            return None
        return max(0.0, min(self._deadline(js)[1] for js in self._groups()) - time.monotonic())

    def _work(self) -> None:
        while True:
            with self._cond:
                group = None
                while not self._stop and (group := self._next_group()) is None:
                    self._cond.wait(self._wait_time())
                if self._stop:
                    return
                for job in group:
                    self._pending.remove(job)
                self._running += len(group)
                self._running_rows += sum(len(j.items) for j in group)
                self._set_depth()
            try:
                self._run(group)
            finally:
                with self._cond:
                    self._running -= len(group)
                    self._running_rows -= sum(len(j.items) for j in group)
                    self._cond.notify_all()

    def _run(self, group: list[Job]) -> None:
        rows = [item for job in group for item in job.items]
        bucket = self.buckets[bisect.bisect_left(self.buckets, len(rows))]
        start = time.monotonic()
        for job in group:
            job.started = start
            self.metrics.stage_seconds.labels("queue").observe(start - job.enqueued)
        try:
            run = self.engine.images if group[0].kind == "images" else self.engine.captions
            result = run(rows, group[0].opts, bucket)
        except BaseException as err:  # noqa: BLE001 - handed to every waiting request (a 500 there)
            for job in group:
                _resolve(job, exception=err)
            return
        self.metrics.record_batch(group[0].kind, len(rows), bucket, result.seconds)
        finished = time.monotonic()
        with self._cond:
            waiting = sum(len(j.items) for j in self._pending if j.key == group[0].key)
            self._last[group[0].key] = LastBatch(len(rows) + waiting, finished, finished - start)
            rate = len(rows) / max(finished - start, 1e-6)
            self._rows_per_s = rate if self._rows_per_s is None else 0.7 * self._rows_per_s + 0.3 * rate
        offset = 0
        for job in group:
            n = len(job.items)
            _resolve(job, result=(result.outputs[offset : offset + n], result.seconds, start - job.enqueued))
            offset += n


def _resolve(job: Job, result=None, exception=None) -> None:
    def settle():
        if not job.future.done():
            if exception is not None:
                job.future.set_exception(exception)
            else:
                job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting
        pass
