"""Two plain ASGI middlewares (plain rather than @app.middleware("http"), whose wrapped receive hides
client disconnects):

    Frame    every request: an X-Request-ID (the client's, if sane, else a new one) on the response
             and its log line; responses counted by status code; the model requests in flight
             counted (the drain waits for none) and timed; an unexpected exception becomes a JSON 500
             naming the request id, never a dropped connection.
    Access   what a web page in the user's browser must not do (safe by default on a workstation):
             a Host outside --allowed-hosts (DNS rebinding) -> 400; a cross-origin request from an
             origin not given with --cors-origin -> 403; without the --api-key as a Bearer token -> 401
             (GET /health and the page at GET / need none: they hold no data, the page asks for it).

Starlette's TrustedHostMiddleware answers a bad Host in plain text; this answers in errors.py's
one JSON format. CORS itself (preflights, headers) is Starlette's CORSMiddleware, inside Access.
"""
from __future__ import annotations

import hmac
import logging
import re
import time
import traceback
import uuid
from urllib.parse import urlsplit

from flowtok_fast.serve.errors import error

LOG = logging.getLogger("flowtok_fast.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_ROUTES = ("/health", "/")


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class Frame:
    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = header(scope, b"x-request-id")
        rid = given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = None
        model = scope["path"].startswith("/v1/")
        t0 = time.monotonic()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        if model:
            self.state.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - a bug, or the model failing: a JSON 500, logged with the id
            LOG.error("%s %s %s: unexpected error\n%s", rid, scope["method"], scope["path"], traceback.format_exc())
            if status is None:
                status = 500
                await error(500, f"internal error (request id {rid}): see the server log")(scope, receive, send_with_id)
        finally:
            if model:
                self.state.in_flight -= 1
                self.state.metrics.request_seconds.labels(scope["path"]).observe(time.monotonic() - t0)
            self.state.metrics.responses.labels(str(status or 499)).inc()
            client = scope.get("client") or ("-", 0)
            LOG.info("%s %s %s %s %s %.0f ms", rid, client[0], scope["method"], scope["path"], status or "-",
                     1000 * (time.monotonic() - t0))


def host_name(host_header: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    return (urlsplit("//" + host_header).hostname or "").lower()


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The localhost names and the address the server listens on (unless that is every interface)."""
    extra = [] if bind_host in ("0.0.0.0", "::", "") else [bind_host.strip("[]").lower()]
    return list(dict.fromkeys([*LOCAL_NAMES, *extra]))


class Access:
    def __init__(self, app, allowed_hosts: list[str] | None, cors_origins: list[str], api_key: str | None, rejected):
        self.app, self.rejected = app, rejected
        self.any_host = allowed_hosts is None or "*" in allowed_hosts
        self.allowed_hosts = {h.strip("[]").lower() for h in allowed_hosts or ()}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.check(scope)
        if refused is not None:
            self.rejected.labels(refused.reason).inc()
            return await refused(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, scope):
        host = header(scope, b"host") or ""
        if not self.any_host and host_name(host) not in self.allowed_hosts:
            return error(400, f"Host {host[:100]!r} is not served here: expected one of {sorted(self.allowed_hosts)} "
                              "(start the server with --allowed-hosts to add names)", "Host", reason="bad_host")
        origin = header(scope, b"origin")
        if origin is not None and not self.same_origin(origin, host) and origin.rstrip("/").lower() not in self.cors_origins:
            return error(403, f"cross-origin request from {origin[:100]!r} refused: start the server with "
                              f"--cors-origin {origin[:100]} to allow that site", "Origin", reason="cross_origin")
        preflight = scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method") is not None
        if self.api_key and scope["path"] not in OPEN_ROUTES and not preflight:
            given = header(scope, b"authorization") or ""
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error(401, "missing or wrong API key: expected the header 'Authorization: Bearer <key>'",
                             "Authorization", headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
        return None

    @staticmethod
    def same_origin(origin: str, host: str) -> bool:
        """The page this server sent (GET /) calling back: the origin's host:port is the Host."""
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()
