"""`flowtok-fast serve`: loads the model, warms every bucket, serves until SIGTERM / Ctrl-C.

SIGTERM (or the first Ctrl-C) drains: new requests get 503, queued and running ones finish, then
uvicorn closes the connections and the process exits 0. A second signal stops at once."""
from __future__ import annotations

import argparse
import signal
import threading
import time

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast.errors import UserError

DEFAULT_BUCKETS = "1,2,4,8,16,32,64"


def buckets(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1 such as {DEFAULT_BUCKETS}, got {text!r}")
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
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--buckets", type=buckets, default=DEFAULT_BUCKETS,
                   help="the static batch sizes; a batch is padded up to the next one")
    p.add_argument("--max-wait-ms", type=_positive(float), default=20.0,
                   help="run a partly filled batch once its oldest request has waited this long")
    p.add_argument("--max-queue", type=_positive(int), default=256, help="queued images before 429")
    p.add_argument("--request-timeout-s", type=_positive(float), default=120.0,
                   help="longest a request waits (a request may ask for less with timeout_s)")
    p.add_argument("--mode", default="eager", choices=("eager", "compile", "graph"),
                   help="sampler: eager; compile (torch.compile); graph (CUDA: the loop as one CUDA graph)")
    p.add_argument("--warm-steps", type=_positive(int), default=20,
                   help="steps of the warm-up batches (compile/graph build one sampler per batch and steps)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads")
    return p


def load_engine(args):
    from flowtok_fast.captioning import FlowTokCaptioner
    from flowtok_fast.configs import get_config
    from flowtok_fast.pipeline import FlowTokPipeline
    from flowtok_fast.serve.engine import ImageEngine

    kw = dict(device=args.device, sampler_mode=args.mode)
    if args.model_dir:
        pipe = FlowTokPipeline.from_pretrained(args.model_dir, **kw)
    elif args.random_weights:
        pipe = FlowTokPipeline.random(get_config(args.config, args.resolution), **kw)
    else:
        raise UserError("no weights given: pass --model-dir DIR, or --random-weights [--config tiny]")
    if args.mode == "graph" and pipe.device.type != "cuda":
        raise UserError(f"--mode graph needs a CUDA device (CUDA graphs); the model is on {pipe.device}: "
                        "use --mode eager or --mode compile")
    captioner = FlowTokCaptioner.from_pretrained(args.caption_model_dir, device=args.device) \
        if args.caption_model_dir else None
    return ImageEngine(pipe, captioner)


def serve(app, state, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            state.draining = True  # new requests: 503 from now on
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self):
            while state.in_flight or not state.batcher.idle():
                time.sleep(0.02)
            self.should_exit = True  # uvicorn closes the sockets and runs the lifespan shutdown

    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from flowtok_fast.pipeline import SamplingOptions
    from flowtok_fast.serve.app import ServerState, create_app

    engine = load_engine(args)
    warm = SamplingOptions(steps=args.warm_steps) if args.mode != "eager" else SamplingOptions(steps=1)
    state = ServerState(engine, args.buckets, args.max_wait_ms, args.max_queue, args.request_timeout_s, warm)
    print(f"flowtok-fast serve: warming buckets {args.buckets} ({args.mode}); GET /health says 'ready' when done",
          flush=True)
    serve(create_app(state), state, args.host, args.port)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
