"""The batcher: an image depends only on (prompt, seed, options), and concurrent requests share
forwards (counted from GET /metrics)."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import make_state, metric, running_server

STEPS = 3


@pytest.fixture(scope="module")
def server(tiny_engine):
    with running_server(make_state(tiny_engine, buckets=(1, 4, 16), max_wait_ms=400)) as url:
        yield url


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{url}/v1/images", json=b, timeout=120), bodies))


def test_image_is_the_same_alone_and_inside_a_batch_of_16_mixed_requests(server, tiny_engine):
    target = {"prompt": "a red cube on a table", "seed": 7, "steps": STEPS, "cfg": 2.0}
    alone = png(httpx.post(f"{server}/v1/images", json=target, timeout=120))

    # the pipeline itself, called directly with this one prompt and seed: what serving must reproduce
    direct = np.asarray(tiny_engine.pipe([target["prompt"]], steps=STEPS, cfg_scale=2.0, seed=7)[0]).astype(int)
    assert np.abs(alone - direct).max() <= 1

    mates = [{"prompt": f"mate {i}", "seed": 100 + i, "steps": STEPS, "cfg": 2.0} for i in range(11)]
    mates += [{"prompt": "other options", "seed": i, "steps": 2, "cfg": 1.5} for i in range(4)]  # another group
    before = metric(server, "flowtok_serve_batch_size_count", 'kind="images"')
    responses = post_all(server, mates[:6] + [target] + mates[6:])
    batches = metric(server, "flowtok_serve_batch_size_count", 'kind="images"') - before
    together = png(responses[6])
    assert np.abs(together - alone).max() <= 1  # at most 1/255 per pixel
    assert batches < 16  # it really ran inside a shared batch


def test_row_in_a_padded_batch_of_16_equals_the_row_alone_in_floats(tiny_engine):
    """The random tiny model's images are nearly black (different prompts differ by ~1/255 in 8 bits),
    so the 8-bit comparison above is checked here on the float images, where mates do differ."""
    import torch

    from flowtok_fast.pipeline import SamplingOptions
    from flowtok_fast.serve.engine import Row

    opts = SamplingOptions(steps=STEPS, cfg_scale=2.0)
    target = Row("a red cube on a table", 7)
    alone = tiny_engine.image_tensors([target], opts, 1).outputs[0]
    mates = [Row(f"mate {i}", 100 + i) for i in range(14)]
    batch = tiny_engine.image_tensors(mates[:5] + [target] + mates[5:], opts, 16).outputs  # 15 rows + 1 padding
    gap = (batch[5] - alone).abs().max().item()
    assert gap <= 1 / 255, gap
    print(f"float gap alone vs in a batch of 16: {gap:.3g} (bit-identical: {torch.equal(batch[5], alone)})")
    # a mate's image is far from the target's (so the bound above can fail), and so is the target drawn
    # the pipeline's batched way (one generator for the whole batch): per-row noise is what makes it hold
    mate_gap = (batch[0] - alone).abs().max().item()
    assert mate_gap > 100 * gap and mate_gap > 1e-4, (mate_gap, gap)
    batched_draw = tiny_engine.pipe([m.prompt for m in mates[:5]] + [target.prompt], steps=STEPS, cfg_scale=2.0,
                                    seed=7, output="tensor")[5]
    draw_gap = (batched_draw - alone).abs().max().item()
    assert draw_gap > 100 * gap and draw_gap > 1e-4, (draw_gap, gap)


def test_16_concurrent_requests_take_far_fewer_than_16_forwards(server):
    before_batches = metric(server, "flowtok_serve_batch_size_count", 'kind="images"')
    before_rows = metric(server, "flowtok_serve_batch_size_sum", 'kind="images"')
    responses = post_all(server, [{"prompt": f"prompt {i}", "seed": i, "steps": 2} for i in range(16)])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    batches = metric(server, "flowtok_serve_batch_size_count", 'kind="images"') - before_batches
    rows = metric(server, "flowtok_serve_batch_size_sum", 'kind="images"') - before_rows
    assert rows == 16
    assert batches <= 4, f"16 concurrent requests ran as {batches:.0f} batches"


def test_json_response_for_several_images_carries_seeds_and_the_timing_split(server):
    r = httpx.post(f"{server}/v1/images", json={"prompts": ["a", "b"], "n": 2, "seed": 5, "steps": 2}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [5, 6, 7, 8]
    assert len(body["images"]) == 4
    assert set(body["timing_s"]) == {"queue", "text", "flow", "decode"}
    # row k of a request is the image of (its prompt, seed + k) alone
    single = httpx.post(f"{server}/v1/images", json={"prompt": "b", "seed": 7, "steps": 2}, timeout=120)
    import base64

    third = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][2]))).convert("RGB")).astype(int)
    assert np.abs(third - png(single)).max() <= 1
