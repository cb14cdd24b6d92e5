"""Serve tests: one tiny random-weights pipeline (and captioner) for the whole session, the shipped
shapes models for the browser test, and real
uvicorn servers on 127.0.0.1 in background threads (real sockets: concurrency, disconnects)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from flowtok_fast.pipeline import SamplingOptions


@pytest.fixture(scope="session")
def tiny_engine():
    import torch

    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.pipeline import FlowTokPipeline
    from flowtok_fast.serve.engine import ImageEngine

    torch.set_num_threads(1)  # the CI machine has 2 cores; tests run several servers side by side
    return ImageEngine(FlowTokPipeline.random("tiny", seed=0), FlowTokCaptioner.random("tiny", seed=1))


@pytest.fixture(scope="session")
def shapes_engine():
    """The trained shapes models in the box (examples/shapes/models): real images a test can score."""
    import torch

    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.pipeline import FlowTokPipeline
    from flowtok_fast.serve.engine import ImageEngine

    torch.set_num_threads(1)
    models = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "models"
    return ImageEngine(FlowTokPipeline.from_pretrained(str(models / "t2i")),
                       FlowTokCaptioner.from_pretrained(str(models / "i2t")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(state, health_headers=None):
    """A uvicorn server for `state` on a free port in a thread; yields its base URL once ready."""
    import uvicorn

    from flowtok_fast.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health").status_code == 200:
                break
        time.sleep(0.05)
    else:
        raise RuntimeError("the test server did not become ready in 120 s")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_state(engine, buckets=(1, 4, 16), max_wait_ms=300.0, max_queue=64, timeout_s=60.0, **kw):
    """kw: ServerState's access settings; the Host names default to the server's own default list
    plus TestClient's 'testserver'."""
    from flowtok_fast.serve.app import ServerState
    from flowtok_fast.serve.middleware import LOCAL_NAMES

    kw.setdefault("allowed_hosts", [*LOCAL_NAMES, "testserver"])
    return ServerState(engine, list(buckets), max_wait_ms, max_queue, timeout_s, SamplingOptions(steps=1), **kw)


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample from GET /metrics, e.g. metric(url, "flowtok_serve_batch_size_count", 'kind="images"')."""
    text = httpx.get(f"{url}/metrics").text
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0
