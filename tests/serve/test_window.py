"""The batcher's adaptive window, on a stand-in engine with a fixed batch time (no model, no HTTP):
16 closed-loop clients with staggered think times fill batches of 16, one client is never held
back by the window, and a full queue's Retry-After is the time the queue takes to drain."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from flowtok_fast.pipeline import SamplingOptions
from flowtok_fast.serve.batcher import Batcher, Job, QueueFull, TooLarge
from flowtok_fast.serve.engine import BatchResult, Row
from flowtok_fast.serve.metrics import ServeMetrics

BUCKETS = [1, 2, 4, 8, 16]
OPTS = SamplingOptions(steps=1)


class TimedEngine:
    """Each batch takes `seconds`; records (real rows, bucket). `gate` holds batches when cleared."""

    def __init__(self, seconds: float):
        self.seconds, self.batches = seconds, []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def images(self, rows, opts, bucket):
        self.entered.set()
        assert self.gate.wait(30)
        time.sleep(self.seconds)
        self.batches.append((len(rows), bucket))
        return BatchResult([r.seed for r in rows], {"flow": self.seconds})


def make(seconds: float, max_wait_s: float, max_queue: int = 256):
    engine = TimedEngine(seconds)
    batcher = Batcher(engine, BUCKETS, max_wait_s, max_queue, ServeMetrics(BUCKETS))
    batcher.start()
    return engine, batcher


async def request(batcher, seed: int, rows: int = 1) -> Job:
    loop = asyncio.get_running_loop()
    job = Job("images", [Row("p", seed + k) for k in range(rows)], OPTS, loop, loop.create_future())
    batcher.submit(job)
    await job.future
    return job


def test_16_staggered_closed_loop_clients_fill_batches_of_16():
    engine, batcher = make(seconds=0.25, max_wait_s=0.01)  # a fixed 10 ms window alone would split them
    rng = random.Random(0)

    async def client(i: int):
        for r in range(6):
            await asyncio.sleep(rng.uniform(0.0, 0.04))  # think time: clients come back staggered
            await request(batcher, 1000 * i + r)

    async def main():
        await asyncio.gather(*(client(i) for i in range(16)))

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    settled = engine.batches[1:-1]  # the first is the cold start (the plain window), the last the final stragglers
    fill = sum(rows for rows, _ in settled) / sum(bucket for _, bucket in settled)
    print(f"batches {engine.batches}; fill after the cold start {fill:.3f}")
    assert sum(rows for rows, _ in engine.batches) == 96
    assert fill >= 0.95, engine.batches


def test_one_client_is_not_held_back_by_the_window():
    engine, batcher = make(seconds=0.02, max_wait_s=0.5)  # a long window: waiting for it would show

    async def main():
        waits = []
        for i in range(5):
            job = await request(batcher, i)
            waits.append(job.started - job.enqueued)
        return waits

    try:
        waits = asyncio.run(main())
    finally:
        batcher.stop()
    assert waits[0] >= 0.45  # cold: the plain window, nothing known about the arrivals yet
    assert max(waits[1:]) < 0.25, waits  # then one expected per batch: it runs at once (~1 ms; a loaded machine)


def test_a_job_larger_than_the_queue_is_too_large_and_retry_after_is_the_drain_time():
    engine, batcher = make(seconds=0.25, max_wait_s=0.001, max_queue=40)

    async def main():
        await request(batcher, 0, rows=4)  # measures the drain rate: 4 rows in 0.25 s = 16 rows/s
        engine.gate.clear()
        engine.entered.clear()
        loop = asyncio.get_running_loop()
        with pytest.raises(TooLarge, match="--max-queue"):
            batcher.submit(Job("images", [Row("p", k) for k in range(41)], OPTS, loop, loop.create_future()))
        running = asyncio.ensure_future(request(batcher, 100, rows=16))
        await asyncio.sleep(0)  # submitted
        assert await asyncio.to_thread(engine.entered.wait, 10)  # 16 rows running (held at the gate)
        queued = [asyncio.ensure_future(request(batcher, 200 + 4 * k, rows=4)) for k in range(10)]
        await asyncio.sleep(0)  # 40 rows queued: the queue is full
        with pytest.raises(QueueFull) as full:
            batcher.submit(Job("images", [Row("p", 999)], OPTS, loop, loop.create_future()))
        engine.gate.set()
        await asyncio.gather(running, *queued)
        return full.value.retry_after_s

    try:
        retry = asyncio.run(main())
    finally:
        engine.gate.set()
        batcher.stop()
    assert 3 <= retry <= 10, retry  # 56 rows at <= 16 rows/s: about 4 s (a loaded machine measures a lower rate)
