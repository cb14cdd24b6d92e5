"""POST /v1/images/generations in the shape of OpenAI's images API, so an OpenAI client works unchanged:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.images.generate(prompt="a red circle", n=2, size="64x64", response_format="b64_json")

Request: prompt (required), n, size ("WxH": the model's resolution, or "auto"), response_format
("b64_json": this server keeps no files, so no URLs), model and user (accepted, not used); this
server's own seed, steps, cfg, sampler, grid, timeout_s may ride along (the client's extra_body).
Response: {"created": unix seconds, "data": [{"b64_json": PNG}], "flowtok": {seeds, options, timing_s}}.
"""
from __future__ import annotations

from flowtok_fast.serve import inputs
from flowtok_fast.serve.inputs import RequestError

FIELDS = ("prompt", "n", "size", "response_format", "model", "user", "seed", "steps", "cfg", "sampler", "grid",
          "timeout_s")
RESPONSE_FORMATS = ("b64_json",)


def generation_request(body: dict, largest_bucket: int, resolution: int, server_timeout: float):
    """-> (prompts, n, seed, given options, timeout): what inputs.image_request gives for /v1/images."""
    inputs.unknown_fields(body, FIELDS)
    if "prompt" not in body:
        raise RequestError("prompt", "required: expected a string")
    texts = [inputs.prompt_text("prompt", body["prompt"])]
    n = inputs.integer(body, "n", 1, 1, largest_bucket)
    size = body.get("size", "auto")
    if size not in ("auto", f"{resolution}x{resolution}"):
        raise RequestError("size", f"{inputs.shown(size)}: this model makes {resolution}x{resolution} images: "
                                   f"expected '{resolution}x{resolution}' or 'auto'")
    if body.get("response_format", "b64_json") not in RESPONSE_FORMATS:
        raise RequestError("response_format", f"{inputs.shown(body['response_format'])}: this server keeps no files "
                                              "to link to: expected 'b64_json'")
    for field in ("model", "user"):
        if field in body and not isinstance(body[field], str):
            raise RequestError(field, f"expected a string, got a JSON {inputs.kind(body[field])}")
    seed = inputs.integer(body, "seed", 0, 0, inputs.MAX_SEED - n)
    return texts, n, seed, inputs.options(body), inputs.timeout(body, server_timeout)
