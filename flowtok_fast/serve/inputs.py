"""Request bodies -> checked values. Every problem is a RequestError naming the field, what was found
and what was expected; the app turns it into a 4xx JSON body (errors.py). These functions run on
the worker pool (app.py), never on the event loop: a body may take a while to parse or decode.

Sampling options a request leaves out stay None here: the model's recommended values fill them
(`pipe.sampling_options`), so a model directory decides the defaults, not the server."""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import tempfile

from flowtok_fast import flow
from flowtok_fast.errors import UserError
from flowtok_fast.validate import MAX_ABS_CFG, MAX_STEPS  # noqa: F401  (the CLI's and the API's bounds)

MAX_BODY_BYTES = 20 * 1024 * 1024  # a 512 px PNG is < 1 MB; anything this big is a mistake or an attack
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4000  # CLIP reads 77 tokens (~300 characters); past this it is not a prompt
IMAGE_FIELDS = ("prompt", "prompts", "seed", "steps", "cfg", "sampler", "grid", "n", "format", "timeout_s")
CAPTION_FIELDS = ("image", "images", "steps", "cfg", "sampler", "grid", "timeout_s")
FORMATS = ("png", "json")


class RequestError(UserError):
    def __init__(self, field: str | None, message: str, status: int = 400, reason: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.detail, self.status = field, message, status
        self.reason = reason or {413: "too_large", 415: "unsupported_media_type"}.get(status, "bad_request")


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: a 1 MB string is not echoed back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(body: bytes) -> dict:
    if not body:
        raise RequestError(None, "empty body: expected a JSON object")
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise RequestError(None, f"invalid JSON{where}: {getattr(err, 'msg', err)}") from None
    except RecursionError:  # 100k nested '['
        raise RequestError(None, "invalid JSON: nested too deeply: expected a flat JSON object") from None
    except ValueError as err:  # an integer of more than 4300 digits (Python's conversion limit)
        raise RequestError(None, f"invalid JSON: {str(err).split(':')[0]}: expected numbers of a sane size") from None
    if not isinstance(value, dict):
        raise RequestError(None, f"expected a JSON object, got a JSON {kind(value)}")
    return value


def _no_constant(name: str):
    raise RequestError(None, f"invalid JSON: {name} is not a JSON number (expected a finite number)")


def unknown_fields(body: dict, known: tuple) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise RequestError(unknown[0], f"unknown field(s) {shown(unknown, 200)}: expected some of {list(known)}")


def integer(body: dict, field: str, default, low: int, high: int):
    value = body.get(field, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(field, f"expected an integer in [{low}, {high}], got {shown(value)}")
    return value


def number(body: dict, field: str, default, low: float, high: float):
    value = body.get(field, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(field, f"expected a finite number in [{low:g}, {high:g}], got {shown(value)}")
    return float(value)


def choice(body: dict, field: str, default, choices: tuple):
    value = body.get(field, default)
    if value is None and default is None:
        return None
    if value not in choices:
        raise RequestError(field, f"unknown value {shown(value)}: expected one of {list(choices)}")
    return value


def options(body: dict) -> dict:
    """The sampling options the request gives (None: the model's recommended value)."""
    return dict(steps=integer(body, "steps", None, 1, MAX_STEPS),
                cfg_scale=number(body, "cfg", None, -MAX_ABS_CFG, MAX_ABS_CFG),
                method=choice(body, "sampler", None, flow.METHODS),
                grid=choice(body, "grid", None, flow.GRIDS))


def timeout(body: dict, server_max: float) -> float:
    return number(body, "timeout_s", server_max, 0.0, server_max) if "timeout_s" in body else server_max


def prompt_text(field: str, value) -> str:
    if not isinstance(value, str):
        raise RequestError(field, f"expected a string, got a JSON {kind(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(field, f"{len(value):,} characters: expected at most {MAX_PROMPT_CHARS:,} "
                                  "(CLIP reads the first 77 tokens, about 300 characters)", 413)
    return value


def prompts(body: dict, largest_bucket: int) -> list[str]:
    if ("prompt" in body) == ("prompts" in body):
        raise RequestError("prompt", "expected exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
    if "prompt" in body:
        return [prompt_text("prompt", body["prompt"])]
    value = body["prompts"]
    if not isinstance(value, list) or not value:
        raise RequestError("prompts", f"expected a non-empty list of strings, got {kind(value)}")
    if len(value) > largest_bucket:  # before looking at each one
        raise RequestError("prompts", f"{len(value)} prompts: expected at most {largest_bucket} (the largest batch) "
                                      "per request")
    return [prompt_text(f"prompts[{i}]", p) for i, p in enumerate(value)]


def image_request(body: dict, largest_bucket: int, server_timeout: float):
    """-> (prompts, n, seed, options, format, timeout). Rows: each prompt n times; row k has seed + k."""
    unknown_fields(body, IMAGE_FIELDS)
    texts = prompts(body, largest_bucket)
    n = integer(body, "n", 1, 1, largest_bucket)
    if len(texts) * n > largest_bucket:
        raise RequestError("n", f"{len(texts)} prompt(s) x n={n} = {len(texts) * n} images: expected at most "
                                f"{largest_bucket} (the largest batch) per request")
    seed = integer(body, "seed", 0, 0, MAX_SEED - len(texts) * n)
    opts = options(body)
    fmt = choice(body, "format", "png" if len(texts) * n == 1 else "json", FORMATS)
    if fmt == "png" and len(texts) * n > 1:
        raise RequestError("format", "'png' returns one image: expected 'json' for more than one")
    return texts, n, seed, opts, fmt, timeout(body, server_timeout)


def kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# ---------------------------------------------------------------- captions


def decode_base64(field: str, text) -> bytes:
    if not isinstance(text, str):
        raise RequestError(field, f"expected a base64 string, got a JSON {kind(text)}")
    if text.startswith("data:") and "," in text:  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None


def image_pixels(field: str, data: bytes, resolution: int):
    """Uploaded bytes -> [3, r, r] in [0, 1], through the same checks as `flowtok-fast caption`
    (header first: not an image, decompression bomb, aspect ratio, corrupt data), so the pixels
    are the CLI's. The bytes pass through a private temporary file, removed at once."""
    from flowtok_fast.captioning import load_image

    if not data:
        raise RequestError(field, "empty upload: expected an image file (PNG, JPEG, WebP, ...)")
    fd, path = tempfile.mkstemp(prefix="flowtok-serve-", suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_image(path, resolution)
    except UserError as err:
        status = 413 if "pixels, more than" in str(err) or "decompression bomb" in str(err) else 400
        raise RequestError(field, str(err).replace(f"{path}: ", ""), status) from None
    finally:
        os.unlink(path)
