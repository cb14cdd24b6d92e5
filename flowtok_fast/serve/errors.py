"""One JSON error format for every 4xx/5xx the server sends, the framework's own included:

    {"error": {"message": "...", "field": "steps" | null, "type": "bad_request"}}

`message` and `type` are where OpenAI's API puts them, so OpenAI clients show the message; `type`
is also the reason label of flowtok_serve_rejected_requests_total."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from flowtok_fast.serve.inputs import RequestError

REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
           408: "body_timeout", 413: "too_large", 415: "unsupported_media_type", 429: "queue_full", 499: "disconnected",
           500: "server_error", 503: "unavailable", 504: "timeout"}


def error(status: int, message: str, field: str | None = None, headers: dict | None = None,
          reason: str | None = None) -> JSONResponse:
    reason = reason or REASONS.get(status, "error")
    response = JSONResponse({"error": {"message": message, "field": field, "type": reason}}, status, headers=headers)
    response.reason = reason  # for the middlewares' counters
    return response


def install(app: FastAPI, rejected) -> None:
    """Exception handlers: ours (RequestError) and the framework's (404, 405, validation) in the one
    format; every 4xx counted in `rejected` by reason."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        rejected.labels(err.reason).inc()
        headers = {"Connection": "close"} if err.status in (408, 413) else None  # the rest of the body is unread
        return error(err.status, str(err), err.field, headers, err.reason)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        reason = REASONS.get(err.status_code, "error")
        rejected.labels(reason).inc()
        return error(err.status_code, f"{request.method} {request.url.path}: {err.detail}", headers=err.headers,
                     reason=reason)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        rejected.labels("bad_request").inc()
        first = (err.errors() or [{}])[0]
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, first.get("msg", "invalid request"), field)
