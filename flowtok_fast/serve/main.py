"""`flowtok-fast serve`: loads the model, warms every bucket, serves until SIGTERM / Ctrl-C.

SIGTERM (or the first Ctrl-C) drains: new requests get 503, queued and running ones finish (a client
that stops sending its body is dropped after --body-timeout-s), then uvicorn closes the connections
and the process exits 0. A second signal exits at once (exit code 1).

The address is checked and bound before the model loads: a bad --host/--port or a port in use is one
line and exit 2, not a traceback after the load."""
from __future__ import annotations

import argparse
import copy
import errno
import os
import signal
import socket
import sys
import threading
import time

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.errors import UserError

DEFAULT_BUCKETS = "1,2,4,8,16,32,64"
API_KEY_ENV = "FLOWTOK_SERVE_API_KEY"


def buckets(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1 such as {DEFAULT_BUCKETS}, got {text!r}")
    return values


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port number in [1, 65535], got {text!r}")
    return value


def names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value != value:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return parse


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """'(default: X)' only where a default means something (not None, not an off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="flowtok-fast serve", description=__doc__,
                      formatter_class=_Defaults)
    p.add_argument("--model-dir", help="a flowtok-fast model directory (config.json + model.safetensors)")
    p.add_argument("--random-weights", action="store_true", help="random weights (tests, load tests, demos)")
    p.add_argument("--config", default="tiny", help="model size for --random-weights: tiny, S, B, L, XL, H")
    p.add_argument("--resolution", type=int, default=256, help="tokenizer resolution for --random-weights (S..H)")
    p.add_argument("--caption-model-dir", help="a captioning model directory: enables POST /v1/captions")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=8000, help="TCP port")
    p.add_argument("--allowed-hosts", type=names, default=None,
                   help="Host header names served, comma-separated ('*': any); refuses DNS-rebinding pages "
                        "(default: localhost, 127.0.0.1, ::1 and the --host address)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="a web origin (https://app.example.org) whose pages may call this server; repeatable "
                        "(default: none, cross-origin requests are refused)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and the page "
                        f"(or set {API_KEY_ENV}; visible in ps when given here)")
    p.add_argument("--body-timeout-s", type=_positive(float), default=30.0,
                   help="a request whose body has not fully arrived by then gets 408")
    p.add_argument("--workers", type=_positive(int), default=2,
                   help="threads that parse bodies, decode uploads and encode PNGs (off the event loop)")
    p.add_argument("--buckets", type=buckets, default=DEFAULT_BUCKETS,
                   help="the static batch sizes; a batch is padded up to the next one")
    p.add_argument("--max-wait-ms", type=_positive(float), default=20.0,
                   help="with no batch in the last batch time: run a partly filled batch once its oldest request "
                        "has waited this long (otherwise the window adapts to the arrivals: batcher.py)")
    p.add_argument("--max-queue", type=_positive(int), default=256, help="queued images before 429")
    p.add_argument("--request-timeout-s", type=_positive(float), default=120.0,
                   help="longest a request waits (a request may ask for less with timeout_s)")
    p.add_argument("--mode", default="eager", choices=("auto", "eager", "compile", "graph"),
                   help="sampler: eager; compile (torch.compile); graph (CUDA: the loop as one CUDA graph); auto (the "
                        "fastest for this device and dtype, printed: flowtok_fast/deploy/mode.py)")
    p.add_argument("--warm-steps", type=_positive(int), default=None,
                   help="steps of the warm-up batches (compile/graph build one sampler per batch, steps and cfg; "
                        "default: the model's recommended sampling, which requests without steps/cfg get)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on every CPU (the same images as generate's --dtype auto); "
                        "the choice is printed")
    return p


def bind(parser, host: str, port_number: int) -> socket.socket:
    """The listening socket, made before the model loads (uvicorn is handed it)."""
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        parser.error(f"--host {host}: not an address or name this machine can listen on ({err})")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        why = "already in use: stop the other server or pick another --port" if err.errno == errno.EADDRINUSE \
            else err.strerror
        parser.error(f"cannot listen on {host}:{port_number}: {why}")
    sock.set_inheritable(True)
    return sock


def check_args(args) -> None:
    """What can be refused before anything listens or loads."""
    from flowtok_fast.validate import resolve_device

    if not args.model_dir and not args.random_weights:
        raise UserError("no weights given: pass --model-dir DIR, or --random-weights [--config tiny]")
    device = resolve_device(args.device)
    if args.mode == "graph" and device.type != "cuda":
        raise UserError(f"--mode graph needs a CUDA device (CUDA graphs); the model would run on {device}: "
                        "use --mode eager or --mode compile")


def load_engine(args):
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.deploy.dtype import resolve_dtype
    from flowtok_fast.loading import load_text_to_image
    from flowtok_fast.serve.engine import ImageEngine
    from flowtok_fast.validate import resolve_device

    from flowtok_fast.deploy.mode import resolve_mode

    dtype, why = resolve_dtype(args.dtype, resolve_device(args.device))
    args.mode, why_mode = resolve_mode(args.mode, resolve_device(args.device), dtype)  # auto -> the mode it picks
    pipe = load_text_to_image(model_dir=args.model_dir, random_config=args.config if args.random_weights else None,
                              resolution=args.resolution, device=args.device, sampler_mode=args.mode, dtype=dtype)
    captioner = FlowTokCaptioner.from_pretrained(args.caption_model_dir, device=args.device, dtype=dtype,
                                                 sampler_mode=args.mode) if args.caption_model_dir else None
    print(f"flowtok-fast serve: {why}; {why_mode}", flush=True)
    return ImageEngine(pipe, captioner)


def log_config() -> dict:
    """uvicorn's logging, plus this server's access lines (each with its request id), in place of
    uvicorn's own access log (which has no id)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["flowtok_fast.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(app, state, sock: socket.socket, log_level: str = "info") -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            if state.draining:  # the second signal: no more waiting
                print(f"flowtok-fast serve: second signal: exiting now ({state.in_flight} request(s) unanswered)",
                      file=sys.stderr, flush=True)
                os._exit(1)
            state.draining = True  # new requests: 503 from now on
            print("flowtok-fast serve: draining (a second signal exits at once)", file=sys.stderr, flush=True)
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self):
            while state.in_flight or not state.batcher.idle():
                time.sleep(0.02)
            self.should_exit = True  # uvicorn closes the sockets and runs the lifespan shutdown

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30, access_log=False,
                            log_config=log_config())
    DrainingServer(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    sock = bind(parser, args.host, args.port)  # before the (slow) model load
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from flowtok_fast.pipeline import SamplingOptions
    from flowtok_fast.serve.app import ServerState, create_app

    engine = load_engine(args)
    # compile/graph: warm the sampler requests without options will use (the model's recommendation)
    warm = engine.pipe.sampling_options(steps=args.warm_steps) if args.mode != "eager" else SamplingOptions(steps=1)
    from flowtok_fast.serve.middleware import default_allowed_hosts

    hosts = args.allowed_hosts or default_allowed_hosts(args.host)
    state = ServerState(engine, args.buckets, args.max_wait_ms, args.max_queue, args.request_timeout_s, warm,
                        allowed_hosts=hosts, cors_origins=args.cors_origin or [], workers=args.workers,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, body_timeout_s=args.body_timeout_s)
    print(f"flowtok-fast serve: warming buckets {args.buckets} ({args.mode}); GET /health says 'ready' when done; "
          f"Host names served: {', '.join(hosts)}; API key: {'required' if state.api_key else 'none'}; "
          f"CORS origins: {', '.join(args.cors_origin or []) or 'none'}", flush=True)
    serve(create_app(state), state, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
