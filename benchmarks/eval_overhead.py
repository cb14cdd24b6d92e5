"""Evaluation overhead of `evaluate t2i`: everything except the generator and decoder (PNG shard
writes, clean-fid resizing, Inception features, the per-shard scores file) as a share of the
generation time, at a config on this machine. Target (issue 13): <= 10% on CPU at the tiny config.

    OMP_NUM_THREADS=2 python benchmarks/eval_overhead.py --config tiny --num-images 64 --inception v3

--inception v3: a randomly initialised Inception-v3 (torchvision's architecture with clean-fid's
TorchScript interface, traced: the same FLOPs as the real inception-2015-12-05.pt, numbers meaningless);
--inception tiny: the test stand-in (plumbing cost only); or a path to the real file.
Prints one JSON object: seconds per stage (write and score run in a background thread, overlapped
with generation), images/s, overhead = (wall - generate) / generate: what the evaluation adds to
the wall time. On a CPU both sides share the cores, so overlapping hides little there."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowtok_fast.evaluation.generation import generate_shards, pipeline_images  # noqa: E402
from flowtok_fast.evaluation.inception import InceptionFeatures  # noqa: E402
from flowtok_fast.evaluation.prompts import PromptRecord  # noqa: E402
from flowtok_fast.evaluation.scoring import ShardScorer  # noqa: E402
from flowtok_fast.pipeline import FlowTokPipeline, SamplingOptions  # noqa: E402


class InceptionV3Interface(torch.nn.Module):
    """torchvision Inception-v3 (random weights, no classifier) behind clean-fid's TorchScript interface."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()
        net.dropout = torch.nn.Identity()
        self.layers = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # clean mode calls .layers on normalised input
        return self.layers((x - 128) / 128)


def inception_file(kind: str, folder: str) -> str:
    if kind not in ("v3", "tiny"):
        return kind
    path = os.path.join(folder, f"{kind}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "tiny":
            from tests.evaluation.tiny_inception import save_tiny_inception

            return save_tiny_inception(path)
        torch.jit.trace(InceptionV3Interface().eval(), torch.zeros(1, 3, 299, 299)).save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inception", default="v3", help="v3 | tiny | a path to inception-2015-12-05.pt")
    p.add_argument("--format", default="png", choices=("png", "tar"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    pipeline = FlowTokPipeline.random(args.config, device=args.device)
    opts = SamplingOptions(steps=args.steps)
    make = pipeline_images(pipeline, opts)
    make(["warm-up"], [0])  # the CLIP tokenizer loads once per process: not part of either side
    records = [PromptRecord(f"a photo of {i} colourful shapes on a table") for i in range(args.num_images)]
    with tempfile.TemporaryDirectory() as tmp:
        inception = InceptionFeatures(inception_file(args.inception, tmp), args.device, args.batch_size)
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        scorer = ShardScorer(folder, args.format, inception, [r.prompt for r in records])
        t = time.perf_counter()
        stats = generate_shards(make, records, folder, fmt=args.format, shard_size=args.shard_size,
                                batch_size=args.batch_size, on_shard=scorer, progress=False)
        wall = time.perf_counter() - t
    gen = stats["generate_seconds"]
    print(json.dumps({
        "config": args.config, "device": args.device, "threads": torch.get_num_threads(), "steps": args.steps,
        "images": args.num_images, "batch_size": args.batch_size, "inception": args.inception,
        "resolution": pipeline.config.tokenizer.resolution,
        "generate_s": round(gen, 3), "score_s": round(stats["score_seconds"], 3),
        "write_s": round(stats["write_seconds"], 3), "wall_s": round(wall, 3),
        "images_per_s": round(args.num_images / wall, 2), "overhead": round((wall - gen) / gen, 4),
        "target_overhead": 0.10}))


if __name__ == "__main__":
    main()
