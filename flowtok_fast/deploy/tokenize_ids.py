"""`flowtok-fast tokenize`: prompts -> the C++ runner's inputs (tokenising in C++ is out of scope).

    ids file    one line per prompt: the 77 CLIP token ids, space-separated (open_clip's BPE,
                start/end tokens, padding 0)
    noise file  the seed's text-VAE noise, exactly what FlowTokPipeline / PackagePipeline draw on
                the CPU for these prompts (torch.Generator("cpu").manual_seed(seed), randn
                [n, 77, 16]): an ASCII header line `flowtok-noise N 77 16` then N*77*16
                little-endian float32
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.errors import UserError

NOISE_MAGIC = "flowtok-noise"


def _atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind


def write_ids(path: str | Path, ids: torch.Tensor) -> None:
    _atomic_write(path, "".join(" ".join(map(str, row)) + "\n" for row in ids.tolist()).encode())


def seeded_noise(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((n, NUM_TOKENS, TOKEN_CHANNELS), generator=gen)


def write_noise(path: str | Path, noise: torch.Tensor) -> None:
    header = f"{NOISE_MAGIC} {noise.shape[0]} {NUM_TOKENS} {TOKEN_CHANNELS}\n".encode()
    _atomic_write(path, header + noise.float().contiguous().numpy().astype("<f4").tobytes())


def read_noise(path: str | Path) -> torch.Tensor:
    data = Path(path).read_bytes()
    header, _, body = data.partition(b"\n")
    fields = header.decode("ascii", "replace").split()
    if len(fields) != 4 or fields[0] != NOISE_MAGIC or fields[2:] != [str(NUM_TOKENS), str(TOKEN_CHANNELS)]:
        raise UserError(f"{path}: header {header[:40]!r}, expected '{NOISE_MAGIC} N {NUM_TOKENS} {TOKEN_CHANNELS}'")
    n = int(fields[1])
    if len(body) != n * NUM_TOKENS * TOKEN_CHANNELS * 4:
        raise UserError(f"{path}: {len(body)} bytes of noise, expected {n * NUM_TOKENS * TOKEN_CHANNELS * 4} for {n} prompt(s)")
    return torch.from_numpy(np.frombuffer(body, dtype="<f4").copy()).view(n, NUM_TOKENS, TOKEN_CHANNELS)


def main(argv: list[str] | None = None) -> int:
    from flowtok_fast.cli_errors import OneLineParser
    from flowtok_fast.models.text import tokenize
    from flowtok_fast.pipeline import warn_if_truncated
    from flowtok_fast.validate import check_output_file, check_prompts, read_prompt_file

    p = OneLineParser(prog="flowtok-fast tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", help="a UTF-8 text file with one prompt per line")
    p.add_argument("--out", required=True, help="the ids file to write (one line of 77 integers per prompt)")
    p.add_argument("--noise-out", help="also write the seed's noise for these prompts (the runner's NOISE file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (as generate --seed)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file")
    if args.seed < 0:
        raise UserError(f"--seed: expected an integer >= 0, got {args.seed}")
    check_output_file(args.out, "--out")  # before any work: a directory, an unwritable place
    if args.noise_out:
        check_output_file(args.noise_out, "--noise-out")
    prompts = check_prompts(prompts)
    warn_if_truncated(prompts)
    write_ids(args.out, tokenize(prompts))
    if args.noise_out:
        write_noise(args.noise_out, seeded_noise(len(prompts), args.seed))
    print(f"{len(prompts)} prompt(s) -> {args.out}" + (f", noise (seed {args.seed}) -> {args.noise_out}" if args.noise_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
