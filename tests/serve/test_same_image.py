"""One prompt, seed and set of options give the same PNG bytes from the Python API, `flowtok-fast
generate` and `flowtok-fast serve`, under each --dtype; and a model directory's recommended sampling
(config.json 'sampling') is what all three use when the request names no steps / cfg, which the
server's response and page say."""
from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import flowing_tiny, run_cli
from tests.serve.conftest import make_state

PROMPT, SEED = "a red cube on a blue table", 5
RECOMMENDED = dict(steps=3, cfg_scale=1.5)  # not the paper's 20 / 2.0: the model directory says so


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from flowtok_fast.sampling import Recipe

    pipe = flowing_tiny(0)  # images that are not black: pixels differ between options and seeds
    pipe.sampling = Recipe(**RECOMMENDED)
    out = tmp_path_factory.mktemp("serve_same") / "model"
    pipe.save_pretrained(str(out))
    return str(out)


def png_of(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_api_generate_and_serve_give_the_same_png_bytes(model_dir, dtype, tmp_path, capsys):
    from flowtok_fast.pipeline import FlowTokPipeline
    from flowtok_fast.serve.app import create_app
    from flowtok_fast.serve.main import build_parser, load_engine

    torch.set_num_threads(1)
    api_dtype = {"auto": None, "bf16": torch.bfloat16}[dtype]  # None: the pipeline's own rule (fp32 on a CPU)
    api = png_of(FlowTokPipeline.from_pretrained(model_dir, dtype=api_dtype)([PROMPT], seed=SEED)[0])

    out = tmp_path / "generate.png"
    code, stdout, err = run_cli(["generate", "--model-dir", model_dir, "--prompt", PROMPT, "--seed", str(SEED),
                                 "--dtype", dtype, "--threads", "1", "--out", str(out)], capsys)
    assert code == 0, err

    engine = load_engine(build_parser().parse_args(["--model-dir", model_dir, "--dtype", dtype]))
    assert "dtype" in capsys.readouterr().out  # the why-line, as generate prints it
    with TestClient(create_app(make_state(engine, buckets=(1, 4), max_wait_ms=5), warm_in_background=False)) as c:
        r = c.post("/v1/images", json={"prompt": PROMPT, "seed": SEED})
        assert r.status_code == 200, r.text
        assert r.headers["X-FlowTok-Options"] == "steps=3, cfg=1.5, sampler=euler, grid=reference"
        served = r.content
        page = c.get("/").text
        assert 'id="steps" type="number" value="3"' in page and 'id="cfg" type="number" value="1.5"' in page
        assert c.get("/health").json()["sampling"] == {"steps": 3, "cfg": 1.5, "sampler": "euler", "grid": "reference"}
        other = c.post("/v1/images", json={"prompt": PROMPT, "seed": SEED + 1}).content

    assert served == api, "serve and the Python API differ"
    assert out.read_bytes() == api, "generate and the Python API differ"
    assert other != served  # the comparison can fail: another seed gives other bytes
    # (the tiny model's 8-bit image barely depends on steps and cfg, so those are checked by the
    # X-FlowTok-Options header and the JSON 'options', not by pixels)


def test_explicit_options_override_the_recommendation_in_the_json_response(model_dir):
    from flowtok_fast.serve.main import build_parser, load_engine
    from flowtok_fast.serve.app import create_app

    engine = load_engine(build_parser().parse_args(["--model-dir", model_dir]))
    with TestClient(create_app(make_state(engine, buckets=(1, 4), max_wait_ms=5), warm_in_background=False)) as c:
        body = c.post("/v1/images", json={"prompts": ["a", "b"], "steps": 2, "format": "json"}).json()
        assert body["options"] == {"steps": 2, "cfg": 1.5, "sampler": "euler", "grid": "reference"}
