"""`flowtok-fast serve` as a process: SIGTERM drains (in-flight requests finish, new ones get 503,
then it exits 0). Runs the module's main() exactly as the CLI does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serve.conftest import free_port


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flowtok_fast.serve.main", "--random-weights", "--port", str(port),
                             "--buckets", "1,4", "--max-wait-ms", "5", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited early: {(tmp_path / 'server.log').read_text()}"
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                health = httpx.get(f"{url}/health")
                assert health.status_code in (200, 503)  # 503 while it warms
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        slow = {}
        worker = threading.Thread(target=lambda: slow.setdefault("r", httpx.post(
            f"{url}/v1/images", json={"prompt": "slow", "n": 4, "steps": 500}, timeout=120)))  # seconds, even on an idle machine
        worker.start()
        time.sleep(0.5)  # it is running on the model thread now
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{url}/v1/images", json={"prompt": "late", "steps": 1}, timeout=30)
        assert refused.status_code == 503, refused.text
        assert httpx.get(f"{url}/health").json()["status"] == "draining"
        worker.join(timeout=120)
        assert slow["r"].status_code == 200, slow["r"].text
        assert len(slow["r"].json()["images"]) == 4
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
