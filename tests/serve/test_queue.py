"""The queue under pressure: a client that disconnects is removed, a request past its timeout gets
504 and never runs, a full queue answers 429 with Retry-After; the model thread is held on a gate so
the queue's state is certain."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serve.conftest import make_state, metric, running_server


class GatedEngine:
    """The real tiny engine, but each batch waits for `gate` (warm-up does not)."""

    def __init__(self, engine):
        self.engine, self.captioner, self.pipe, self.resolution = engine, engine.captioner, engine.pipe, engine.resolution
        self.gate, self.entered = threading.Event(), threading.Event()

    def warm(self, buckets, opts):
        self.engine.warm(buckets, opts)

    def images(self, rows, opts, bucket):
        self.entered.set()
        assert self.gate.wait(60)
        return self.engine.images(rows, opts, bucket)


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_disconnect_timeout_and_backpressure(tiny_engine):
    engine = GatedEngine(tiny_engine)
    state = make_state(engine, buckets=(1, 4), max_wait_ms=1, max_queue=3)
    body = {"prompt": "a", "steps": 1}
    try:
        run_scenario(engine, state, body)
    finally:
        engine.gate.set()  # never leave the model thread parked


def run_scenario(engine, state, body):
    with running_server(state) as url, ThreadPoolExecutor(8) as pool:
        post = lambda b: httpx.post(f"{url}/v1/images", json=b, timeout=60)  # noqa: E731
        depth = lambda: metric(url, "flowtok_serve_queue_depth")  # noqa: E731
        first = pool.submit(post, body)
        assert engine.entered.wait(30)  # the model thread is busy with it now

        # a client that goes away is taken out of the queue
        raw = b'{"prompt": "gone", "steps": 1}'
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        wait_for(lambda: depth() == 1, "the raw request to be queued")
        sock.close()
        wait_for(lambda: depth() == 0, "the disconnected request to leave the queue")
        assert metric(url, "flowtok_serve_rejected_requests_total", 'reason="disconnected"') == 1

        # a request past its timeout: 504 naming timeout_s, and it leaves the queue
        t0 = time.monotonic()
        late = post({**body, "timeout_s": 0.3})
        assert late.status_code == 504, late.text
        assert late.json()["error"]["field"] == "timeout_s"
        assert 0.3 <= time.monotonic() - t0 < 5
        assert depth() == 0

        # fill the queue (3 images), then one more: 429 with Retry-After
        queued = [pool.submit(post, {**body, "seed": i}) for i in range(3)]
        wait_for(lambda: depth() == 3, "three queued requests")
        full = post(body)
        assert full.status_code == 429, full.text
        assert int(full.headers["Retry-After"]) >= 1
        assert metric(url, "flowtok_serve_rejected_requests_total", 'reason="queue_full"') == 1

        engine.gate.set()
        assert all(f.result().status_code == 200 for f in [first, *queued])
        # only the 4 answered requests ever ran: the disconnected and timed-out ones never did
        assert metric(url, "flowtok_serve_batch_size_sum", 'kind="images"') == 4
