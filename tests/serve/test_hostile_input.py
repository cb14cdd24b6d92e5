"""Bodies built to break the parser get a 400 in the one JSON error format (never a 500), every
response carries an X-Request-ID and is counted by status code, the framework's own errors use the
same format, and the smaller promises of issue 20 (field names, warnings per prompt, 413 for a
request larger than the whole queue, no /openapi.json)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.serve.conftest import make_state


@pytest.fixture(scope="module")
def client(tiny_engine):
    from flowtok_fast.serve.app import create_app

    state = make_state(tiny_engine, buckets=(1, 4), max_wait_ms=5, max_queue=3)
    with TestClient(create_app(state, warm_in_background=False), raise_server_exceptions=False) as c:
        yield c


def metric(client, name: str, labels: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


def assert_error_format(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "field", "type"} and err["message"], err
    return err


JSON = {"content-type": "application/json"}


def test_100k_nested_brackets_and_a_5000_digit_seed_are_400s_counted_in_metrics(client):
    before = metric(client, "flowtok_serve_responses_total", 'code="400"')
    err = assert_error_format(client.post("/v1/images", content=b"[" * 100_000, headers=JSON), 400)
    assert "nested too deeply" in err["message"]
    err = assert_error_format(client.post("/v1/images", content=b'{"prompt": "a", "seed": ' + b"7" * 5000 + b"}",
                                          headers=JSON), 400)
    assert "digits" in err["message"]
    err = assert_error_format(client.post("/v1/captions", content=b'{"image": ' + b"[" * 100_000, headers=JSON), 400)
    assert metric(client, "flowtok_serve_responses_total", 'code="400"') - before == 3
    assert metric(client, "flowtok_serve_responses_total", 'code="500"') == 0


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/images", 405), ("GET", "/no/such/route", 404),
                                                ("GET", "/openapi.json", 404), ("GET", "/docs", 404)])
def test_the_frameworks_own_errors_use_the_one_format(client, method, path, status):
    assert_error_format(client.request(method, path), status)


def test_a_broken_multipart_upload_uses_the_one_format(client):
    r = client.post("/v1/captions", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"})
    assert_error_format(r, 400)  # no boundary given


def test_too_many_uploaded_files_are_refused_before_any_is_decoded(client):
    files = [("image", (f"{i}.png", b"\x89PNG not decoded", "image/png")) for i in range(6)]
    err = assert_error_format(client.post("/v1/captions", files=files), 400)
    assert "files" in err["message"].lower() or "images" in err["message"]


def test_every_response_has_a_request_id_echoed_when_the_client_sends_a_sane_one(client):
    ids = {client.get("/health").headers["x-request-id"], client.get("/nope").headers["x-request-id"],
           client.post("/v1/images", json={}).headers["x-request-id"]}
    assert len(ids) == 3 and all(len(i) >= 8 for i in ids)
    assert client.get("/health", headers={"X-Request-ID": "job-42.a"}).headers["x-request-id"] == "job-42.a"
    unsafe = client.get("/health", headers={"X-Request-ID": "a b;<" + "x" * 100}).headers["x-request-id"]
    assert "x" * 100 not in unsafe


def test_too_many_prompts_are_named_as_prompts_not_n(client):
    err = assert_error_format(client.post("/v1/images", json={"prompts": ["a"] * 17}), 400)
    assert err["field"] == "prompts" and "at most 4" in err["message"]


def test_a_huge_prompt_is_refused_before_tokenising(client):
    err = assert_error_format(client.post("/v1/images", json={"prompt": "a cat " * 200_000}), 413)
    assert err["field"] == "prompt" and "characters" in err["message"]


def test_two_overlong_prompts_are_warned_each_by_its_own_index(client):
    long = "a red cube " * 40
    r = client.post("/v1/images", json={"prompts": [long, long], "steps": 1})
    assert r.status_code == 200, r.text
    warning = r.headers["X-FlowTok-Warning"]
    assert "prompt 0 is" in warning and "prompt 1 is" in warning
    assert r.json()["warnings"] and len(r.json()["warnings"]) == 2


def test_a_request_larger_than_the_whole_queue_is_413_naming_the_limit(client):
    err = assert_error_format(client.post("/v1/images", json={"prompt": "a", "n": 4, "steps": 1}), 413)
    assert "--max-queue" in err["message"] and "at most 3" in err["message"]


def test_json_endpoints_take_only_application_json(client):
    err = assert_error_format(client.post("/v1/images", content=b'{"prompt": "a"}',
                                          headers={"content-type": "text/plain"}), 415)
    assert "application/json" in err["message"]
    assert_error_format(client.post("/v1/images", content=b'{"prompt": "a"}',
                                    headers={"content-type": "application/x-www-form-urlencoded"}), 415)


def test_words_outside_a_closed_vocabulary_are_warned_in_a_header(shapes_engine):
    from flowtok_fast.serve.app import create_app

    with TestClient(create_app(make_state(shapes_engine, buckets=(1,), max_wait_ms=5), warm_in_background=False)) as c:
        r = c.post("/v1/images", json={"prompt": "a red circle above a purple dragon", "steps": 1})
        assert r.status_code == 200, r.text
        assert "'dragon'" in r.headers["X-FlowTok-Warning"] and "vocabulary" in r.headers["X-FlowTok-Warning"]
        known = c.post("/v1/images", json={"prompt": "a red circle above a blue square", "steps": 1})
        assert "X-FlowTok-Warning" not in known.headers
