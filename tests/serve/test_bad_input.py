"""Every bad input gets a 4xx JSON error naming the field (never a 500), and the server lives on."""
from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.serve.conftest import make_state


@pytest.fixture(scope="module")
def client(tiny_engine):
    from flowtok_fast.serve.app import create_app

    with TestClient(create_app(make_state(tiny_engine, buckets=(1, 4), max_wait_ms=5), warm_in_background=False),
                    raise_server_exceptions=False) as c:
        yield c
        assert c.get("/health").json()["status"] == "ready"  # still serving after all of it


def png_bytes(size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode != "1" else 0).save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGE_BODIES = [  # (body, field named, status)
    ({"seed": 1}, "prompt", 400),
    ({"prompt": 5}, "prompt", 400),
    ({"prompt": None}, "prompt", 400),
    ({"prompt": ["a"]}, "prompt", 400),
    ({"prompt": "a", "prompts": ["b"]}, "prompt", 400),
    ({"prompts": []}, "prompts", 400),
    ({"prompts": ["a", 3]}, "prompts[1]", 400),
    ({"prompt": "a", "steps": 0}, "steps", 400),
    ({"prompt": "a", "steps": 1.5}, "steps", 400),
    ({"prompt": "a", "steps": "20"}, "steps", 400),
    ({"prompt": "a", "steps": True}, "steps", 400),
    ({"prompt": "a", "steps": 10**9}, "steps", 400),
    ({"prompt": "a", "cfg": "nan"}, "cfg", 400),
    ({"prompt": "a", "cfg": 1e300}, "cfg", 400),
    ({"prompt": "a", "n": 0}, "n", 400),
    ({"prompt": "a", "n": 5}, "n", 400),  # over the largest bucket (4)
    ({"prompts": ["a", "b", "c"], "n": 2}, "n", 400),
    ({"prompt": "a", "seed": -1}, "seed", 400),
    ({"prompt": "a", "seed": 2**64}, "seed", 400),
    ({"prompt": "a", "seed": 0.5}, "seed", 400),
    ({"prompt": "a", "sampler": "dpm++"}, "sampler", 400),
    ({"prompt": "a", "grid": "cosine"}, "grid", 400),
    ({"prompt": "a", "format": "gif"}, "format", 400),
    ({"prompt": "a", "n": 2, "format": "png"}, "format", 400),
    ({"prompt": "a", "timeout_s": -1}, "timeout_s", 400),
    ({"prompt": "a", "stpes": 3}, "stpes", 400),
]


@pytest.mark.parametrize("body,field,status", BAD_IMAGE_BODIES, ids=[str(b) for b, _, _ in BAD_IMAGE_BODIES])
def test_bad_image_request_names_the_field(client, body, field, status):
    r = client.post("/v1/images", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"a prompt"', b'{"prompt": "a", "cfg": NaN}',
                                 b'{"prompt": "a", "steps": Infinity}', b"\xff\xfe{"])
def test_invalid_json_is_a_400(client, raw):
    r = client.post("/v1/images", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "JSON" in r.json()["error"]["message"] or "body" in r.json()["error"]["message"]


def test_a_50_mb_body_is_refused_with_413(client):
    r = client.post("/v1/images", content=b"{" + b" " * (50 * 1024 * 1024) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "bytes" in r.json()["error"]["message"]


def test_a_prompt_over_77_tokens_is_truncated_with_a_warning_header(client):
    r = client.post("/v1/images", json={"prompt": "a red cube " * 40, "steps": 1})
    assert r.status_code == 200, r.text
    assert "truncated to 77 tokens" in r.headers["X-FlowTok-Warning"]
    short = client.post("/v1/images", json={"prompt": "a red cube", "steps": 1})
    assert short.status_code == 200 and "X-FlowTok-Warning" not in short.headers


def test_caption_of_an_uploaded_image_and_of_base64(client):
    r = client.post("/v1/captions", files={"image": ("x.png", png_bytes(), "image/png")}, data={"steps": "2"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["captions"][0], str) and len(r.json()["captions"]) == 1
    r = client.post("/v1/captions", json={"images": [base64.b64encode(png_bytes()).decode()] * 2, "steps": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["captions"]) == 2


BAD_UPLOADS = [  # (files or json, field, status)
    ({"files": {"image": ("x.png", b"this is not an image", "image/png")}}, "image", 400),
    ({"files": {"image": ("x.png", b"", "image/png")}}, "image", 400),
    ({"files": {"picture": ("x.png", png_bytes(), "image/png")}}, "image", 400),
    ({"files": {"image": ("x.png", png_bytes(), "image/png")}, "data": {"steps": "many"}}, "steps", 400),
    ({"files": {"image": ("x.png", png_bytes(), "image/png")}, "data": {"cfg": "nan"}}, "cfg", 400),
    ({"files": {"image": ("x.png", png_bytes((640, 20)), "image/png")}}, "image", 400),  # aspect 32:1
    ({"files": {"image": ("bomb.png", png_bytes((10000, 10000), "1"), "image/png")}}, "image", 413),
    ({"json": {"image": "%%% not base64"}}, "image", 400),
    ({"json": {"image": 7}}, "image", 400),
    ({"json": {"image": base64.b64encode(b"GIF89a garbage").decode()}}, "image", 400),
    ({"json": {"steps": 2}}, "image", 400),
]


@pytest.mark.parametrize("kw,field,status", BAD_UPLOADS, ids=range(len(BAD_UPLOADS)))
def test_bad_caption_upload_names_the_field(client, kw, field, status):
    r = client.post("/v1/captions", **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_rejections_are_counted_by_reason(client):
    text = client.get("/metrics").text
    assert 'flowtok_serve_rejected_requests_total{reason="bad_request"}' in text
    assert 'flowtok_serve_rejected_requests_total{reason="too_large"}' in text


def test_the_page_has_a_prompt_box_and_a_generate_button(client):
    html = client.get("/").text
    assert 'id="prompt"' in html and 'id="generate"' in html and "/v1/images" in html


def test_every_request_hears_a_students_note(tiny_engine, monkeypatch):
    """A student asked for a step count it was not distilled for: each request says so (the
    model's own Python warning is said once per process, the server's notes are per request)."""
    from flowtok_fast.sampling import Recipe
    from flowtok_fast.serve.app import create_app

    monkeypatch.setattr(tiny_engine.pipe, "sampling", Recipe(steps=1, cfg_scale=1.0, distilled_steps=(1,), guidance=2.0))
    with TestClient(create_app(make_state(tiny_engine, buckets=(1,), max_wait_ms=5), warm_in_background=False),
                    raise_server_exceptions=False) as c:
        for _ in range(2):
            r = c.post("/v1/images", json={"prompt": "a red cube", "steps": 2})
            assert r.status_code == 200, r.text
            assert "distilled for steps 1" in r.headers["X-FlowTok-Warning"]
