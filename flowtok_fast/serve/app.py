"""The HTTP routes (FastAPI): POST /v1/images, POST /v1/captions, GET /health, GET /metrics, GET /.

Why FastAPI on uvicorn: a well-kept, widely deployed ASGI stack. FastAPI is a thin layer over
Starlette (routing, multipart uploads through python-multipart, exception handlers, a test client);
uvicorn gives HTTP/1.1 keep-alive and a graceful shutdown we extend into a drain (main.py). Bodies
are parsed by hand (inputs.py) rather than by pydantic models so every 4xx names its field in
this project's words and a NaN or a bool never passes as a number.

A request is answered by the event loop; the model runs on the batcher's thread. A handler waits
for its job while polling for a client disconnect and its deadline (both remove a queued job).
"""
from __future__ import annotations

import asyncio
import base64
import io
import math
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from flowtok_fast.models.text import overlong_prompts
from flowtok_fast.serve import inputs
from flowtok_fast.serve.batcher import Batcher, Job, QueueFull
from flowtok_fast.serve.engine import Row
from flowtok_fast.serve.metrics import ServeMetrics
from flowtok_fast.serve.page import PAGE

POLL_S = 0.25  # how often a waiting request checks for a client disconnect (and its deadline, if sooner)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ServerState:
    """What the routes share: the batcher, metrics, and the ready / draining flags."""

    def __init__(self, engine, buckets: list[int], max_wait_ms: float, max_queue: int,
                 request_timeout_s: float = 120.0, warm_options=None):
        self.engine = engine
        self.metrics = ServeMetrics(buckets)
        self.batcher = Batcher(engine, buckets, max_wait_ms / 1000.0, max_queue, self.metrics)
        self.request_timeout_s = request_timeout_s
        self.warm_options = warm_options
        self.ready = False
        self.failed = None  # why warm-up failed, if it did
        self.draining = False
        self.in_flight = 0  # model requests being answered (the drain waits for 0)

    def warm_and_start(self) -> None:
        """On a thread of its own: warm every bucket, then start the model thread, then ready."""
        from flowtok_fast.pipeline import SamplingOptions

        try:
            self.engine.warm(self.batcher.buckets, self.warm_options or SamplingOptions(steps=1))
        except Exception as err:  # noqa: BLE001 - shown by /health and on stderr; the server stays up
            self.failed = f"warm-up failed: {type(err).__name__}: {err}"
            print(f"flowtok-fast serve: error: {self.failed}", file=sys.stderr, flush=True)
            raise
        self.batcher.start()
        self.ready = True


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status, headers=headers)


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


async def read_body(request: Request) -> bytes:
    """The body, refusing more than MAX_BODY_BYTES before reading it all (413)."""
    limit = inputs.MAX_BODY_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise inputs.RequestError(None, f"body of {int(declared):,} bytes: expected at most {limit:,}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise inputs.RequestError(None, f"body over {limit:,} bytes: expected at most {limit:,}", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's cache: request.form() then parses these bytes, not the spent stream
    return body


def create_app(state: ServerState, warm_in_background: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if warm_in_background:
            asyncio.get_running_loop().run_in_executor(None, state.warm_and_start)
        else:
            state.warm_and_start()
        yield
        state.batcher.stop()

    app = FastAPI(title="flowtok-fast serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CountInFlight, state=state)
    app.state.serve = state
    m = state.metrics

    @app.exception_handler(inputs.RequestError)
    async def bad_request(request: Request, err: inputs.RequestError):
        m.rejected.labels("too_large" if err.status == 413 else "bad_request").inc()
        return error(err.status, str(err), err.field)

    def refuse_if_not_serving():
        if state.draining:
            m.rejected.labels("draining").inc()
            return error(503, "the server is shutting down", headers={"Retry-After": "5", "Connection": "close"})
        if not state.ready:
            m.rejected.labels("warming").inc()
            return error(503, "the server is warming up: see GET /health", headers={"Retry-After": "5"})
        return None

    async def run_job(request: Request, kind: str, items: list, opts, timeout_s: float):
        """-> (outputs, batch stage seconds, queue seconds) or an error response."""
        loop = asyncio.get_running_loop()
        job = Job(kind, items, opts, loop, loop.create_future())
        try:
            state.batcher.submit(job)
        except QueueFull as err:
            m.rejected.labels("queue_full").inc()
            return error(429, f"too many requests queued ({err}): retry later",
                         headers={"Retry-After": str(max(1, math.ceil(state.batcher.max_wait_s * 10))) })
        deadline = time.monotonic() + timeout_s
        while True:
            done, _ = await asyncio.wait([job.future], timeout=min(POLL_S, max(0.0, deadline - time.monotonic())))
            if done:
                return job.future.result()
            if await request.is_disconnected():
                state.batcher.cancel(job)
                m.rejected.labels("disconnected").inc()
                return error(499, "client disconnected")
            if time.monotonic() >= deadline:
                state.batcher.cancel(job)  # if it already started, its result is dropped
                m.rejected.labels("timeout").inc()
                return error(504, f"not done within timeout_s={timeout_s:g} s", "timeout_s")

    @app.post("/v1/images")
    async def images(request: Request):
        if (refused := refuse_if_not_serving()) is not None:
            return refused
        body = inputs.parse_json(await read_body(request))
        texts, n, seed, opts, fmt, timeout_s = inputs.image_request(body, state.batcher.largest,
                                                                    state.request_timeout_s)
        headers = {}
        long = overlong_prompts(texts)
        if long:  # as the pipeline does: truncated to CLIP's 77 tokens, with a warning (a header here)
            headers["X-FlowTok-Warning"] = "; ".join(
                f"prompt {texts.index(p)} is {k + 2} CLIP tokens long: truncated to 77 tokens" for p, k in long)
        rows = [Row(p, seed + i * n + j) for i, p in enumerate(texts) for j in range(n)]
        result = await run_job(request, "images", rows, opts, timeout_s)
        if isinstance(result, Response):
            return result
        arrays, batch_s, queue_s = result
        timing = {"queue": queue_s, **batch_s}
        if fmt == "png":
            headers["X-FlowTok-Timing"] = ", ".join(f"{k}={v:.4f}" for k, v in timing.items())
            return Response(png_bytes(arrays[0]), media_type="image/png", headers=headers)
        pngs = [base64.b64encode(png_bytes(a)).decode("ascii") for a in arrays]
        return JSONResponse({"images": pngs, "seeds": [r.seed for r in rows], "timing_s": timing}, headers=headers)

    @app.post("/v1/captions")
    async def captions(request: Request):
        if state.engine.captioner is None:
            return error(404, "no captioning model: start the server with --caption-model-dir DIR")
        if (refused := refuse_if_not_serving()) is not None:
            return refused
        body_bytes = await read_body(request)
        resolution = state.engine.captioner.config.tokenizer.resolution
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            uploads = form.getlist("image")
            if not uploads or any(isinstance(u, str) for u in uploads):
                raise inputs.RequestError("image", "expected one or more file parts named 'image'")
            fields = {k: v for k, v in form.items() if k != "image"}
            body = {k: _form_number(k, v) for k, v in fields.items()}
            datas = [await u.read() for u in uploads]
        else:
            body = inputs.parse_json(body_bytes)
            if ("image" in body) == ("images" in body):
                raise inputs.RequestError("image", "expected exactly one of 'image' (base64) or 'images' (a list)")
            listed = body["images"] if "images" in body else [body["image"]]
            if not isinstance(listed, list) or not listed:
                raise inputs.RequestError("images", "expected a non-empty list of base64 strings")
            datas = [inputs.decode_base64(f"images[{i}]" if "images" in body else "image", s) for i, s in enumerate(listed)]
        inputs._unknown(body, inputs.CAPTION_FIELDS)
        if len(datas) > state.batcher.largest:
            raise inputs.RequestError("image", f"{len(datas)} images: expected at most {state.batcher.largest}")
        opts = inputs.options(body, 1.0)
        timeout_s = inputs.timeout(body, state.request_timeout_s)
        pixels = [inputs.image_pixels("image" if len(datas) == 1 else f"image[{i}]", d, resolution)
                  for i, d in enumerate(datas)]
        result = await run_job(request, "captions", pixels, opts, timeout_s)
        if isinstance(result, Response):
            return result
        texts, batch_s, queue_s = result
        return {"captions": texts, "timing_s": {"queue": queue_s, **batch_s}}

    @app.get("/health")
    async def health():
        status = "draining" if state.draining else "ready" if state.ready else "failed" if state.failed else "warming"
        return JSONResponse({"status": status, "buckets": state.batcher.buckets, "error": state.failed},
                            200 if status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    return app


class CountInFlight:
    """Counts the model requests being answered (the drain waits for none), and times them. Plain
    ASGI rather than @app.middleware("http"), whose wrapped receive hides client disconnects."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        t0 = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
            self.state.metrics.request_seconds.labels(scope["path"]).observe(time.monotonic() - t0)


def _form_number(field: str, text):
    """Multipart fields arrive as strings: steps -> int, cfg/timeout_s -> float, the rest as is."""
    if not isinstance(text, str):
        raise inputs.RequestError(field, "expected a form field, got a file")
    try:
        if field == "steps":
            return int(text)
        if field in ("cfg", "timeout_s"):
            return float(text)  # 'nan' becomes NaN and is refused by the range check
    except ValueError:
        raise inputs.RequestError(field, f"expected a number, got {text!r}") from None
    return text
