"""Evaluation overhead of `evaluate t2i`: everything except the generator and decoder (PNG shard
writes, clean-fid resizing, Inception features, the per-shard scores file) as a share of the
generation time, at a config on this machine. Target (issue 13): <= 10% on CPU at the tiny config.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/eval_overhead.py --config tiny --num-images 32
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/eval_overhead.py --config B --num-images 2 --batch-size 2 --shard-size 2

Prints one JSON object with
- per-image costs, each part alone on this process's threads: GFLOP and seconds of the generator +
  decoder, GFLOP and seconds of Inception (as InceptionFeatures runs it, and in the plain NCHW
  layout), clean-fid's resize and PNG encoding;
- eval_cost_ratio = (resize + PNG + Inception seconds) / generator+decoder seconds: on a CPU the
  evaluation's work shares the cores with generation, so this ratio is the least overhead any
  batching / overlap / thread split can reach (overlap moves work between cores, it does not remove it);
  target_reachable says whether it is <= 10%; inception_gflop_budget is what a 10% share would allow;
- the measured run: generation alone (the generator and decoder, nothing written) vs the
  `evaluate t2i` loop (shards written and scored in its background thread, overlapped), and
  overhead = (wall_evaluate - wall_generate_only) / wall_generate_only.

--inception v3: a randomly initialised Inception-v3 (torchvision's architecture with clean-fid's
TorchScript interface, traced: the FLOPs of the real inception-2015-12-05.pt, numbers meaningless);
--inception tiny: the test stand-in (plumbing cost only); or a path to the real file.
--scorer-threads K: torch threads of the background (writing + scoring) thread (default: the same as generation)."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def per_image_seconds(fn, n: int, repeats: int = 2) -> float:
    fn()  # warm-up (allocators, oneDNN primitives)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats / n


def gflop_per_image(fn, n: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / n / 1e9


def part_costs(make, inception: InceptionFeatures, prompts: list[str], seeds: list[int]) -> dict:
    """Each part alone, per image: where the evaluation's time goes and what the floor is."""
    n = len(prompts)
    images = make(prompts, seeds)
    batch = torch.stack([inception.preprocess(im) for im in images])
    nchw = lambda: inception.model(batch)  # noqa: E731
    with torch.no_grad():
        used = lambda: inception.features(batch)  # noqa: E731 - channels_last on a CPU
        same = (used() - nchw()).abs().max() / nchw().abs().max()
        costs = {
            "gen_dec_gflop_per_image": gflop_per_image(lambda: make(prompts, seeds), n),
            "inception_gflop_per_image": gflop_per_image(nchw, n),
            "gen_dec_s_per_image": per_image_seconds(lambda: make(prompts, seeds), n, 1),
            "resize_s_per_image": per_image_seconds(lambda: [inception.preprocess(im) for im in images], n),
            "png_s_per_image": per_image_seconds(lambda: [im.save(io.BytesIO(), format="PNG") for im in images], n),
            "inception_s_per_image": per_image_seconds(used, n),
            "inception_nchw_s_per_image": per_image_seconds(nchw, n),
            "inception_layout_max_rel_diff": float(same),
        }
    eval_s = costs["resize_s_per_image"] + costs["png_s_per_image"] + costs["inception_s_per_image"]
    costs["eval_cost_ratio"] = eval_s / costs["gen_dec_s_per_image"]
    costs["target_reachable"] = costs["eval_cost_ratio"] <= 0.10
    costs["inception_gflop_budget"] = 0.10 * costs["gen_dec_gflop_per_image"]
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in costs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inception", default="v3", help="v3 | tiny | a path to inception-2015-12-05.pt")
    p.add_argument("--scorer-threads", type=int, default=None)
    p.add_argument("--format", default="png", choices=("png", "tar"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    pipeline = FlowTokPipeline.random(args.config, device=args.device)
    make = pipeline_images(pipeline, SamplingOptions(steps=args.steps))
    make(["warm-up"], [0])  # the CLIP tokenizer loads once per process: not part of either side
    records = [PromptRecord(f"a photo of {i} colourful shapes on a table") for i in range(args.num_images)]
    prompts, seeds = [r.prompt for r in records], list(range(args.num_images))
    with tempfile.TemporaryDirectory() as tmp:
        inception = InceptionFeatures(inception_file(args.inception, tmp), args.device, args.batch_size)
        first = min(args.batch_size, args.num_images)
        parts = part_costs(make, inception, prompts[:first], seeds[:first])

        t = time.perf_counter()
        for lo in range(0, args.num_images, args.batch_size):
            make(prompts[lo:lo + args.batch_size], seeds[lo:lo + args.batch_size])
        wall_gen = time.perf_counter() - t

        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        scorer = ShardScorer(folder, args.format, inception, prompts)
        on_shard = scorer
        if args.scorer_threads:
            def on_shard(shard, images):  # torch's thread count is per thread: this sets the scorer's only
                torch.set_num_threads(args.scorer_threads)
                scorer(shard, images)
        t = time.perf_counter()
        stats = generate_shards(make, records, folder, fmt=args.format, shard_size=args.shard_size,
                                batch_size=args.batch_size, on_shard=on_shard, progress=False)
        wall = time.perf_counter() - t
    print(json.dumps({
        "config": args.config, "device": args.device, "threads": torch.get_num_threads(),
        "scorer_threads": args.scorer_threads or torch.get_num_threads(), "steps": args.steps,
        "images": args.num_images, "batch_size": args.batch_size, "shard_size": args.shard_size,
        "inception": args.inception, "resolution": pipeline.config.tokenizer.resolution,
        "load_average_start_end": [load_at_start, [round(x, 2) for x in os.getloadavg()]], **parts,
        "wall_generate_only_s": round(wall_gen, 3), "wall_evaluate_s": round(wall, 3),
        "generate_s_in_evaluate": round(stats["generate_seconds"], 3), "score_s": round(stats["score_seconds"], 3),
        "write_s": round(stats["write_seconds"], 3), "images_per_s": round(args.num_images / wall, 3),
        "overhead": round((wall - wall_gen) / wall_gen, 4), "target_overhead": 0.10}))


if __name__ == "__main__":
    main()
