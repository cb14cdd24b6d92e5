"""Caption request bodies (JSON with base64 images, or a multipart upload) -> (fields, image bytes),
and image bytes -> pixels. Everything here runs on the worker pool, never on the event loop: a
20 MB multipart body takes ~0.2 s to split, and a large image seconds to decode."""
from __future__ import annotations

import asyncio

from starlette.formparsers import MultiPartException
from starlette.requests import Request

from flowtok_fast.serve import inputs
from flowtok_fast.serve.inputs import RequestError


def parse_form(body: bytes, content_type: str, largest: int) -> tuple[dict, list[bytes]]:
    """A multipart body, split by Starlette's parser (python-multipart, its limits and errors) on
    this worker thread's own short-lived event loop."""

    async def parse():
        request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                           "headers": [(b"content-type", content_type.encode("latin-1"))]})
        request._body = body  # parsed from these bytes
        try:
            form = await request.form(max_files=largest + 1, max_fields=len(inputs.CAPTION_FIELDS))
        except MultiPartException as err:
            raise RequestError(None, f"invalid multipart body: {err.message}") from None
        try:
            uploads = form.getlist("image")
            if not uploads or any(isinstance(u, str) for u in uploads):
                raise RequestError("image", "expected one or more file parts named 'image'")
            fields = {k: form_number(k, v) for k, v in form.multi_items() if k != "image"}
            return fields, [await u.read() for u in uploads]
        finally:
            await form.close()

    return asyncio.run(parse())


def parse_caption_json(raw: bytes) -> tuple[dict, list[bytes]]:
    body = inputs.parse_json(raw)
    if ("image" in body) == ("images" in body):
        raise RequestError("image", "expected exactly one of 'image' (base64) or 'images' (a list)")
    listed = body["images"] if "images" in body else [body["image"]]
    if not isinstance(listed, list) or not listed:
        raise RequestError("images", "expected a non-empty list of base64 strings")
    return body, [inputs.decode_base64(f"images[{i}]" if "images" in body else "image", s) for i, s in enumerate(listed)]


def decode_images(datas: list[bytes], resolution: int) -> list:
    return [inputs.image_pixels("image" if len(datas) == 1 else f"image[{i}]", d, resolution)
            for i, d in enumerate(datas)]


def form_number(field: str, text):
    """Multipart fields arrive as strings: steps -> int, cfg/timeout_s -> float, the rest as is."""
    if not isinstance(text, str):
        raise RequestError(field, "expected a form field, got a file")
    try:
        if field == "steps":
            return int(text)
        if field in ("cfg", "timeout_s"):
            return float(text)  # 'nan' becomes NaN and is refused by the range check
    except ValueError:
        raise RequestError(field, f"expected a number, got {inputs.shown(text)}") from None
    return text
