"""Compare two runs of the example by their digests: `python -m examples.shapes.compare OUT_A OUT_B`.

Prints each digest side by side and the first stage, in the chain's order, whose digest differs
(where the runs parted: `latents` differing means the tokenizer training did); exit code 0 when
all agree, 1 otherwise. The commits and machines are printed too: same digests are expected only
from one commit on one machine (CPU, BLAS path) with the same thread count."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flowtok_fast.errors import UserError

ORDER = ("latents", "tokenizer", "text_autoencoder", "t2i", "i2t", "results")


def read(out: str) -> dict:
    path = Path(out) / "results.json" if Path(out).is_dir() else Path(out)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read a run's results.json ({err})") from None
    if "digests" not in results:
        raise UserError(f"{path}: no digests (written before the example recorded them)")
    return results


def compare(a: dict, b: dict) -> tuple[list[str], str | None]:
    """Lines to print, and the first stage whose digest differs (None: all that both have agree)."""
    lines, first = [], None
    for who, r in (("A", a), ("B", b)):
        p, m = r.get("provenance", {}), r.get("machine", {})
        lines.append(f"{who}: commit {p.get('commit')}{' +local changes' if p.get('dirty') else ''}, "
                     f"{m.get('cpu_model')} ({m.get('torch_cpu_capability')}), {m.get('torch_threads')} thread(s)")
    for stage in ORDER:
        da, db = a["digests"].get(stage), b["digests"].get(stage)
        if da is None and db is None:
            continue
        same = da == db
        if not same and first is None:
            first = stage
        lines.append(f"{stage:17s} {da} {db} {'same' if same else 'DIFFERENT'}")
    return lines, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shapes.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="a run's --out directory (or its results.json)")
    parser.add_argument("b", help="another run's")
    args = parser.parse_args(argv)
    lines, first = compare(read(args.a), read(args.b))
    print("\n".join(lines))
    print("all digests agree" if first is None else f"first difference: {first}")
    return 0 if first is None else 1


if __name__ == "__main__":  # the package's error boundary: bad input is one line and exit code 2
    from flowtok_fast.cli_errors import run

    sys.exit(run("example shapes compare", main, debug=bool(os.environ.get("FLOWTOK_DEBUG"))))
