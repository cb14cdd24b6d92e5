"""Safe by default on a workstation: a web page in the user's browser cannot drive the server.
Cross-origin requests (text/plain included) are refused, a Host outside the allowed list is refused
(DNS rebinding), an --api-key is required as a Bearer token everywhere but /health and the page,
and CORS answers only for a --cors-origin."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.serve.conftest import make_state

KEY = "s3cret-key"
EVIL = "http://evil.example"
FRIEND = "https://app.example.org"


@pytest.fixture(scope="module")
def open_client(tiny_engine):
    """The defaults: no key, no CORS, the localhost names (and TestClient's 'testserver')."""
    from flowtok_fast.serve.app import create_app

    with TestClient(create_app(make_state(tiny_engine, buckets=(1,), max_wait_ms=5), warm_in_background=False)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed_client(tiny_engine):
    from flowtok_fast.serve.app import create_app

    state = make_state(tiny_engine, buckets=(1,), max_wait_ms=5, api_key=KEY, cors_origins=[FRIEND])
    with TestClient(create_app(state, warm_in_background=False)) as c:
        yield c


BODY = b'{"prompt": "a", "steps": 1}'


def test_a_cross_origin_text_plain_post_is_refused_and_never_runs(open_client):
    # what <form enctype="text/plain"> or fetch(..., {mode: "no-cors"}) on any web page sends
    r = open_client.post("/v1/images", content=BODY, headers={"content-type": "text/plain", "origin": EVIL})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["field"] == "Origin" and "--cors-origin" in r.json()["error"]["message"]
    # even as JSON, from another origin
    assert open_client.post("/v1/images", content=BODY, headers={"content-type": "application/json",
                                                                  "origin": EVIL}).status_code == 403
    # the page this server sends (same origin) and clients without an Origin (curl, SDKs) are served
    same = open_client.post("/v1/images", content=BODY, headers={"content-type": "application/json",
                                                                  "origin": "http://testserver"})
    assert same.status_code == 200, same.text
    assert open_client.post("/v1/images", content=BODY, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.7"])
def test_a_host_outside_the_allowed_list_is_refused(open_client, host):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and calls 'itself'."""
    r = open_client.post("/v1/images", content=BODY, headers={"content-type": "application/json", "host": host})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "Host"


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"])
def test_the_localhost_names_are_allowed(open_client, host):
    assert open_client.get("/health", headers={"host": host}).status_code == 200


def test_default_allowed_hosts_are_the_localhost_names_and_the_bind_address():
    from flowtok_fast.serve.middleware import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("192.168.1.20") == ["localhost", "127.0.0.1", "::1", "192.168.1.20"]
    assert default_allowed_hosts("0.0.0.0") == ["localhost", "127.0.0.1", "::1"]


def test_no_cors_headers_unless_an_origin_is_given(open_client):
    r = open_client.options("/v1/images", headers={"origin": EVIL, "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code in (403, 405)


def test_api_key_is_required_as_a_bearer_token_except_for_health_and_the_page(keyed_client):
    json_post = {"content-type": "application/json"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        r = keyed_client.post("/v1/images", content=BODY, headers={**json_post, **headers})
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["field"] == "Authorization" and r.headers["www-authenticate"] == "Bearer"
    assert keyed_client.get("/metrics").status_code == 401
    ok = keyed_client.post("/v1/images", content=BODY, headers={**json_post, "authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200, ok.text
    assert keyed_client.get("/health").status_code == 200
    page = keyed_client.get("/")
    assert page.status_code == 200 and 'id="key"' in page.text and KEY not in page.text


def test_the_given_cors_origin_gets_a_preflight_answer_and_others_do_not(keyed_client):
    ok = keyed_client.options("/v1/images", headers={"origin": FRIEND, "access-control-request-method": "POST",
                                                     "access-control-request-headers": "authorization,content-type"})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == FRIEND
    call = keyed_client.post("/v1/images", content=BODY, headers={"content-type": "application/json", "origin": FRIEND,
                                                                  "authorization": f"Bearer {KEY}"})
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == FRIEND
    other = keyed_client.options("/v1/images", headers={"origin": EVIL, "access-control-request-method": "POST"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
