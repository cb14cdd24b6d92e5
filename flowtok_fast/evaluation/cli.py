"""`flowtok-fast evaluate t2i|i2t ...`: the paper's benchmarks, one command each (see the README's
"Evaluate" section). Under torchrun every rank generates a disjoint slice of shards; rank 0 scores."""
from __future__ import annotations

import argparse
import sys

from flowtok_fast.cli_errors import OneLineParser, run, take_debug_flag


def build_parser() -> argparse.ArgumentParser:
    from flowtok_fast.evaluation import i2t, t2i

    parser = OneLineParser(prog="flowtok-fast evaluate", description=__doc__)
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=OneLineParser)
    t2i.add_arguments(sub.add_parser("t2i", help="text-to-image: FID (clean-fid) and CLIP score"))
    i2t.add_arguments(sub.add_parser("i2t", help="image-to-text: COCO Karpathy captioning metrics"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from flowtok_fast.evaluation import i2t, t2i

    debug, argv = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    work = (lambda: t2i.run_t2i(args)) if args.task == "t2i" else (lambda: i2t.run_i2t(args))
    return run(f"evaluate {args.task}", work, debug)


if __name__ == "__main__":
    raise SystemExit(main())
