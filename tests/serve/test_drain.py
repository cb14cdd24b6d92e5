"""`flowtok-fast serve` as a process: SIGTERM drains (in-flight requests finish, new ones get 503,
then it exits 0); a client stalled in its upload does not hold the drain past the body timeout; a
second SIGTERM exits at once. Runs the module's main() exactly as the CLI does."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.serve.conftest import free_port


def start_server(tmp_path, *extra):
    """(process, url, log file) once GET /health says ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flowtok_fast.serve.main", "--random-weights", "--port", str(port),
                             "--buckets", "1,4", "--max-wait-ms", "5", "--threads", "1", *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"the server exited early: {(tmp_path / 'server.log').read_text()}"
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            health = httpx.get(f"{url}/health")
            assert health.status_code in (200, 503)  # 503 while it warms
            if health.status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stall_an_upload(url: str) -> socket.socket:
    """Headers and 10 of 1000 body bytes, then nothing (the socket is kept open)."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b'{"prompt":')
    return sock


def stop(proc, log) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_a_stalled_upload_holds_the_drain_only_until_the_body_timeout(tmp_path):
    proc, url, log = start_server(tmp_path, "--body-timeout-s", "3")
    try:
        with stall_an_upload(url):
            time.sleep(0.3)  # its handler is reading the body now
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert httpx.get(f"{url}/health").json()["status"] == "draining"
            assert proc.wait(timeout=30) == 0
            assert 2.0 <= time.monotonic() - t0 < 20, "the drain did not wait for the stalled upload's body timeout"
    finally:
        stop(proc, log)


def test_a_second_sigterm_exits_at_once(tmp_path):
    proc, url, log = start_server(tmp_path, "--body-timeout-s", "600")
    try:
        with stall_an_upload(url):
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None, "the first SIGTERM should drain, and the stalled upload holds it"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 1
            assert time.monotonic() - t0 < 3
        log.seek(0)
        assert "second signal: exiting now" in log.read()
    finally:
        stop(proc, log)


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path):
    proc, url, log = start_server(tmp_path)
    try:
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
        stop(proc, log)
