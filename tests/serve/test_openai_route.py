"""POST /v1/images/generations with the official `openai` Python client, unchanged: images come
back as b64_json, the same PNGs /v1/images gives for the seed; the API key is the client's; errors
reach the client as its own exception carrying this server's message."""
from __future__ import annotations

import base64

import httpx
import openai
import pytest

from tests.serve.conftest import make_state, running_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(make_state(tiny_engine, buckets=(1, 4), max_wait_ms=5, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_generates_images_as_b64_json(server, client, tiny_engine):
    size = f"{tiny_engine.resolution}x{tiny_engine.resolution}"
    result = client.images.generate(prompt="a red cube", n=2, size=size, response_format="b64_json",
                                    extra_body={"seed": 11, "steps": 2})
    assert isinstance(result.created, int) and len(result.data) == 2
    pngs = [base64.b64decode(d.b64_json) for d in result.data]
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    # row k is seed + k, as /v1/images makes it
    alone = httpx.post(f"{server}/v1/images", json={"prompt": "a red cube", "seed": 12, "steps": 2},
                       headers={"authorization": f"Bearer {KEY}"}, timeout=120)
    assert alone.status_code == 200 and alone.content == pngs[1]


def test_openai_client_defaults_work_and_errors_carry_the_message(client, tiny_engine):
    assert len(client.images.generate(prompt="a blue ball", extra_body={"steps": 1}).data) == 1  # no size, no format
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a red cube", size="1024x1024")
    assert f"{tiny_engine.resolution}x{tiny_engine.resolution}" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="a red cube", response_format="url")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).images.generate(prompt="a")
