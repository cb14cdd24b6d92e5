"""The HTTP routes (FastAPI): POST /v1/images, POST /v1/images/generations (OpenAI's shape),
POST /v1/captions, GET /health, GET /metrics, GET /.

Why FastAPI on uvicorn: a well-kept, widely deployed ASGI stack. FastAPI is a thin layer over
Starlette (routing, multipart uploads through python-multipart, exception handlers, CORS, a test
client); uvicorn gives HTTP/1.1 keep-alive and a graceful shutdown we extend into a drain (main.py).
Bodies are parsed by hand (inputs.py) rather than by pydantic models so every 4xx names its field in
this project's words and a NaN or a bool never passes as a number.

The event loop only moves bytes: JSON parsing, tokenising prompts (for the warnings), decoding
uploaded images and encoding PNGs run on a small worker pool (`workers` threads), the model on the
batcher's thread. A handler waits for its job while polling for a client disconnect and its deadline
(both remove a queued job).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from flowtok_fast.serve import errors, inputs, openai_api, uploads
from flowtok_fast.serve.batcher import Batcher, Job, QueueFull, TooLarge
from flowtok_fast.serve.engine import Row
from flowtok_fast.serve.errors import error
from flowtok_fast.serve.inputs import RequestError
from flowtok_fast.serve.metrics import ServeMetrics
from flowtok_fast.serve.middleware import LOCAL_NAMES, Access, Frame
from flowtok_fast.serve.page import page_html

POLL_S = 0.25  # how often a waiting request checks for a client disconnect (and its deadline, if sooner)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPTION_NAMES = {"steps": "steps", "cfg_scale": "cfg", "method": "sampler", "grid": "grid"}  # ours -> the API's


class ServerState:
    """What the routes share: the batcher, the worker pool, metrics, the access settings, and the
    ready / draining flags."""

    def __init__(self, engine, buckets: list[int], max_wait_ms: float, max_queue: int,
                 request_timeout_s: float = 120.0, warm_options=None, *, allowed_hosts=LOCAL_NAMES,
                 cors_origins=(), api_key: str | None = None, body_timeout_s: float = 30.0, workers: int = 2):
        self.engine = engine
        self.metrics = ServeMetrics(buckets)
        self.batcher = Batcher(engine, buckets, max_wait_ms / 1000.0, max_queue, self.metrics)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flowtok-serve-parse")
        self.request_timeout_s, self.body_timeout_s = request_timeout_s, body_timeout_s
        self.warm_options = warm_options
        self.allowed_hosts, self.cors_origins, self.api_key = allowed_hosts, list(cors_origins), api_key
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
            print(f"flowtok-fast serve: error: {self.failed}", flush=True)
            raise
        self.batcher.start()
        self.ready = True

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def header_text(text: str) -> str:
    """A header value: one line of ASCII (a prompt may hold anything)."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")[:2000]


def prompt_warnings(texts: list[str], vocabulary) -> list[str]:
    """What the pipeline would warn about: prompts truncated to 77 tokens, words outside a
    closed-vocabulary model's vocabulary. Tokenises: runs on the worker pool."""
    from flowtok_fast.models.text import overlong_prompts, words_outside

    out = []
    for i, p in enumerate(texts):
        out += [f"prompt {i} is {k + 2} CLIP tokens long: truncated to 77 tokens" for _, k in overlong_prompts([p])]
        unknown = words_outside(p, vocabulary) if vocabulary is not None else []
        if unknown:
            out.append(f"prompt {i}: {', '.join(map(repr, unknown[:5]))} outside this model's {len(vocabulary)}-token "
                       "vocabulary (read as a blank)")
    return out


def parse_images(raw: bytes, largest: int, timeout_s: float, vocabulary, openai_resolution: int | None = None):
    body = inputs.parse_json(raw)
    if openai_resolution:
        texts, n, seed, given, timeout = openai_api.generation_request(body, largest, openai_resolution, timeout_s)
        fmt = "json"
    else:
        texts, n, seed, given, fmt, timeout = inputs.image_request(body, largest, timeout_s)
    return texts, n, seed, given, fmt, timeout, prompt_warnings(texts, vocabulary)


def encode_pngs(arrays, as_base64: bool) -> list:
    pngs = [png_bytes(a) for a in arrays]
    return [base64.b64encode(p).decode("ascii") for p in pngs] if as_base64 else pngs


def require_content_type(request: Request, *accepted: str) -> None:
    """JSON endpoints take only application/json: a web page cannot send that cross-site without a
    CORS preflight (text/plain, forms can), so the browser asks first."""
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given not in accepted:
        raise RequestError("Content-Type", f"{given or 'none'!r}: expected {' or '.join(accepted)}", 415)


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The body, refusing more than MAX_BODY_BYTES before reading it all (413) and a client that
    stops sending for good (408 after timeout_s in all)."""
    limit = inputs.MAX_BODY_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(None, f"body of {int(declared):,} bytes: expected at most {limit:,}", 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(None, f"body over {limit:,} bytes: expected at most {limit:,}", 413)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(None, f"body not received within {timeout_s:g} s ({size:,} bytes came)", 408) from None
    except ClientDisconnect:
        raise RequestError(None, "client disconnected while sending the body", 499, "disconnected") from None
    body = b"".join(chunks)
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
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="flowtok-fast serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    m = state.metrics
    if state.cors_origins:  # off unless --cors-origin: then Starlette answers the preflights
        app.add_middleware(CORSMiddleware, allow_origins=state.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-FlowTok-Warning", "X-FlowTok-Options", "X-FlowTok-Timing"])
    app.add_middleware(Access, allowed_hosts=state.allowed_hosts, cors_origins=state.cors_origins,
                       api_key=state.api_key, rejected=m.rejected)
    app.add_middleware(Frame, state=state)  # outermost: every response gets its id and is counted
    app.state.serve = state
    errors.install(app, m.rejected)
    pipe = state.engine.pipe

    def refuse_if_not_serving():
        if state.draining:
            m.rejected.labels("draining").inc()
            return error(503, "the server is shutting down", headers={"Retry-After": "5", "Connection": "close"},
                         reason="draining")
        if not state.ready:
            m.rejected.labels("warming").inc()
            return error(503, "the server is warming up: see GET /health", headers={"Retry-After": "5"},
                         reason="warming")
        return None

    def sampling(model, given: dict, notes: list[str]):
        """The request's options, the model's recommendation where it gave none, and its notes (every
        request gets them: the model's own warnings are said once per process)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts = model.sampling_options(**given)
        notes += model.sampling.notes(opts)
        return opts

    def used(opts) -> dict:
        return {api: getattr(opts, ours) for ours, api in OPTION_NAMES.items()}

    async def run_job(request: Request, kind: str, items: list, opts, timeout_s: float):
        """-> (outputs, batch stage seconds, queue seconds) or an error response."""
        loop = asyncio.get_running_loop()
        job = Job(kind, items, opts, loop, loop.create_future())
        try:
            state.batcher.submit(job)
        except TooLarge as err:
            m.rejected.labels("too_large").inc()
            return error(413, f"{err}: this request can never run here", "n" if kind == "images" else "image")
        except QueueFull as err:
            m.rejected.labels("queue_full").inc()
            return error(429, f"too many requests queued ({err}): retry in {err.retry_after_s} s",
                         headers={"Retry-After": str(err.retry_after_s)})
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

    async def generate(request: Request, openai: bool):
        if (refused := refuse_if_not_serving()) is not None:
            return refused
        require_content_type(request, "application/json")
        raw = await read_body(request, state.body_timeout_s)
        texts, n, seed, given, fmt, timeout_s, notes = await state.off_loop(
            parse_images, raw, state.batcher.largest, state.request_timeout_s, pipe.vocabulary,
            state.engine.resolution if openai else None)
        opts = sampling(pipe, given, notes)
        rows = [Row(p, seed + i * n + j) for i, p in enumerate(texts) for j in range(n)]
        result = await run_job(request, "images", rows, opts, timeout_s)
        if isinstance(result, Response):
            return result
        arrays, batch_s, queue_s = result
        timing = {"queue": queue_s, **batch_s}
        headers = {"X-FlowTok-Options": ", ".join(f"{k}={v}" for k, v in used(opts).items())}
        if notes:
            headers["X-FlowTok-Warning"] = header_text("; ".join(notes))
        if fmt == "png":
            headers["X-FlowTok-Timing"] = ", ".join(f"{k}={v:.4f}" for k, v in timing.items())
            (png,) = await state.off_loop(encode_pngs, arrays, False)
            return Response(png, media_type="image/png", headers=headers)
        pngs = await state.off_loop(encode_pngs, arrays, True)
        extra = {"seeds": [r.seed for r in rows], "options": used(opts), "timing_s": timing, "warnings": notes}
        if openai:
            return JSONResponse({"created": int(time.time()), "data": [{"b64_json": p} for p in pngs], "flowtok": extra},
                                headers=headers)
        return JSONResponse({"images": pngs, **extra}, headers=headers)

    @app.post("/v1/images")
    async def images(request: Request):
        return await generate(request, openai=False)

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request):
        return await generate(request, openai=True)

    @app.post("/v1/captions")
    async def captions(request: Request):
        cap = state.engine.captioner
        if cap is None:
            return error(404, "no captioning model: start the server with --caption-model-dir DIR")
        if (refused := refuse_if_not_serving()) is not None:
            return refused
        require_content_type(request, "application/json", "multipart/form-data")
        raw = await read_body(request, state.body_timeout_s)
        largest = state.batcher.largest
        content_type = request.headers["content-type"]
        if content_type.lower().startswith("multipart/form-data"):
            body, datas = await state.off_loop(uploads.parse_form, raw, content_type, largest)
        else:
            body, datas = await state.off_loop(uploads.parse_caption_json, raw)
        inputs.unknown_fields(body, inputs.CAPTION_FIELDS)
        if len(datas) > largest:  # limits first, then the (slow) decoding
            raise RequestError("image", f"{len(datas)} images: expected at most {largest}")
        given, timeout_s = inputs.options(body), inputs.timeout(body, state.request_timeout_s)
        notes: list[str] = []
        opts = sampling(cap, given, notes)
        pixels = await state.off_loop(uploads.decode_images, datas, cap.config.tokenizer.resolution)
        result = await run_job(request, "captions", pixels, opts, timeout_s)
        if isinstance(result, Response):
            return result
        texts, batch_s, queue_s = result
        return {"captions": texts, "options": used(opts), "timing_s": {"queue": queue_s, **batch_s}, "warnings": notes}

    @app.get("/health")
    async def health():
        status = "draining" if state.draining else "ready" if state.ready else "failed" if state.failed else "warming"
        return JSONResponse({"status": status, "buckets": state.batcher.buckets, "error": state.failed,
                             "sampling": used(pipe.sampling_options())}, 200 if status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html(used(pipe.sampling_options()), api_key=bool(state.api_key))

    return app
