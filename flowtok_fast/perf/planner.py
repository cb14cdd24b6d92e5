"""Training memory planner: will a model size and per-GPU batch fit, and at what recompute cost?

    flowtok-fast plan --model H --global-batch 8192 --gpus 8 --gpu-mem 139   # H200
    python -m flowtok_fast.perf.planner --model H --global-batch 8192 --gpus 8 --gpu-mem 80  # H100

Per GPU (sizes in GiB; --gpu-mem is read as GiB and has no built-in default: this machine's GPU
if it has one, else it must be given):
- training state, fp32 as `flowtok_fast/train/parallelize.py` keeps it (fp32 parameters, autocast
  compute): parameters 4 B, gradients 4 B, AdamW moments 8 B, EMA 4 B per parameter; whole on
  every GPU under DDP, divided by the GPU count under FSDP2, which also holds the gathered fp32
  parameters of two blocks (the current one and the prefetched next);
- activations saved for backward, MEASURED: one training forward (text VAE, generator, flow +
  alignment + KL loss) runs under bf16 autocast on fake tensors (torch FakeTensorMode: CPU
  dispatch, so autocast picks the same dtypes as on the GPU, but meta storage: no memory, no
  compute, any model size). Every storage created during the forward is tracked with a weak
  reference; the bytes still alive once the forward returns are what autograd (and
  checkpointing) hold for backward. Two batch sizes and two generator depths give
  bytes = const + per_sample * batch at the full depth (const: e.g. the bf16 weight copies
  autocast saves for the matmul backward);
- under recomputation, one block's activations re-materialised during its backward;
- a fixed reserve for the CUDA context, allocator fragmentation and transient buffers (--reserve).

Recomputation policies, per DiT block (and, for all but "none", the text VAE layers are
recomputed whole: about 1% of the FLOPs for a large share of the non-DiT activations):
  none       keep everything autograd saves
  pointwise  keep the matmul and attention outputs; recompute norms, modulation, GELU, residuals
  attn       also recompute the attention core and its output projection (keep qkv, fc1, fc2)
  qkv        also recompute the qkv projection (keep attention out, proj, fc1, fc2)
  attn+qkv   recompute the whole attention half (keep fc1 and fc2 outputs only)
  full       keep only the block inputs: one extra block forward in backward
The extra FLOPs of each policy are MEASURED too: FlopCounterMode over forward + backward,
relative to "none" (2 FLOPs per multiply-accumulate of matmuls and attention).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import sys
import tempfile

import torch
from tqdm.auto import tqdm
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowtok_fast.cli_errors import OneLineParser
from flowtok_fast import ops
from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS, FlowTokConfig, get_config
from flowtok_fast.errors import UserError
from flowtok_fast.perf import flops

GIB = 1024**3
POLICIES: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "pointwise": ("qkv", "attn", "proj", "fc1", "fc2"),
    "attn": ("qkv", "fc1", "fc2"),
    "qkv": ("attn", "proj", "fc1", "fc2"),
    "attn+qkv": ("fc1", "fc2"),
    "full": (),
}
SHARDINGS = ("ddp", "fsdp2")
STATE_BYTES = {"params": 4, "grads": 4, "adamw": 8, "ema": 4}  # per parameter, fp32


# ------------------------------------------------------------------ recomputation policies


def _matmul_name(op, args, d: int, hidden: int) -> str | None:
    """Which DiT matmul / attention an aten op belongs to, by its weight shape ([in, out])."""
    aten = torch.ops.aten
    if op in (aten.mm.default, aten.addmm.default):
        w = args[-1]  # mm(a, w^T) and addmm(bias, a, w^T): the transposed weight is last
        return {(d, 3 * d): "qkv", (d, d): "proj", (d, hidden): "fc1", (hidden, d): "fc2"}.get(tuple(w.shape))
    name = str(op)
    if "scaled_dot_product" in name or name.startswith("flowtok.attention_fwd"):
        return "attn"
    return None


def policy_fn(policy: str, width: int, hidden: int):
    """A selective-checkpoint policy (torch.utils.checkpoint) keeping the named matmul outputs."""
    from torch.utils.checkpoint import CheckpointPolicy

    keep = POLICIES[policy]

    def fn(ctx, op, *args, **kwargs):
        if _matmul_name(op, args, width, hidden) in keep:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return fn


def apply_recompute(generator, policy: str) -> None:
    """Make every DiT block of `generator` recompute per `policy` in backward, and the text VAE
    layers whole unless the policy is "none" (in place; "none" restores the plain forwards).
    Overrides `forward` on the instances, so parameter names stay."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if policy not in POLICIES:
        raise UserError(f"unknown recompute policy '{policy}': expected one of {list(POLICIES)}")
    selective = {}
    if POLICIES[policy]:
        selective["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                    policy_fn(policy, generator.cfg.width,
                                                              int(generator.cfg.width * generator.cfg.mlp_ratio)))
    for modules, kw in ((generator.blocks, selective), (generator.context_encoder.layers, {})):
        for m in modules:
            m.__dict__.pop("forward", None)
            if policy != "none":
                m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False, **kw)


# ------------------------------------------------------------------ measuring saved activations


class _LiveStorages(TorchDispatchMode):
    """Records every storage an op creates; `live_bytes()` sums those still alive."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                old = self.refs.get(st._cdata)
                if old is None or old[0].expired():  # a freed address may be reused
                    self.refs[st._cdata] = (StorageWeakRef(st), st.nbytes())
        return out

    def live_bytes(self) -> int:
        gc.collect()  # tensors in reference cycles are garbage, not saved activations
        return sum(n for ref, n in self.refs.values() if not ref.expired())


@contextlib.contextmanager
def _frozen_heap():
    # everything that exists before the measurement is none of its garbage: gc.collect() then
    # scans only the measurement's own objects (a full collection with torch loaded takes ~0.5 s)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _kernels_accept_cpu():
    # The fused ops refuse CPU tensors unless TRITON_INTERPRET=1 (checked at call time). Under
    # fake tensors no kernel runs (their fake implementations give shapes and dtypes), so say so.
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _fake_generator(cfg: FlowTokConfig, mode):
    from flowtok_fast.models.generator import FlowTokGenerator

    with mode:
        return FlowTokGenerator(cfg.generator, cfg.text_vae)


@functools.cache
def measure(model: str | FlowTokConfig, impl: str, policy: str, batch: int, backward: bool = True) -> dict:
    """One training forward (+ backward) at `batch` on fake tensors under bf16 autocast.

    Returns live_bytes (held for backward after the forward), forward and total FLOPs (None
    without the backward: then no FLOPs are counted, which is faster)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model if isinstance(model, FlowTokConfig) else get_config(model)
    flops.register_attention_formulas()
    mode = FakeTensorMode()
    gen = _fake_generator(cfg, mode)
    ops.use(gen, impl)  # imports the kernels (if any) outside _kernels_accept_cpu: their mode is the caller's
    apply_recompute(gen, policy)
    tracker = _LiveStorages()
    counter = FlopCounterMode(display=False) if backward else contextlib.nullcontext()
    with _frozen_heap(), _kernels_accept_cpu(), mode, counter:
        feats = torch.randn(batch, NUM_TOKENS, cfg.text_vae.width)
        z_img = torch.randn(batch, NUM_TOKENS, TOKEN_CHANNELS)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = flops.train_loss(gen, feats, z_img)
        live = tracker.live_bytes() - loss.untyped_storage().nbytes()
        if not backward:
            return {"live_bytes": live, "forward_flops": None, "total_flops": None}
        forward = counter.get_total_flops()
        loss.backward()
        total = counter.get_total_flops()
    return {"live_bytes": live, "forward_flops": forward, "total_flops": total}


def _with_depths(cfg: FlowTokConfig, depth: int, vae_layers: int) -> FlowTokConfig:
    return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, depth=depth),
                               text_vae=dataclasses.replace(cfg.text_vae, layers=vae_layers))


def activation_model(model: str | FlowTokConfig, impl: str, policy: str, batches=(2, 4), depths=(1, 2),
                     cache: bool = True) -> dict:
    """Saved bytes = const + per_sample * batch and training FLOPs per sample at the full depth.

    The DiT blocks are identical, and so are the text VAE layers: every quantity is affine in
    the generator depth and in the VAE depth. So three small models give one block's and one
    VAE layer's share exactly: (DiT d1, VAE d1), (d2, d1) and (d1, d2), depths 1 and 2 (not 0:
    the first block and layer differ from the rest, tested against a full measurement). The
    VAE layers call no ops-layer op and are
    recomputed whole under every policy but "none", so one layer's share is measured once per
    group ("none" or recomputed) with the reference ops. Each model runs at two batch sizes for
    the bytes (forward only at the smaller) and fwd+bwd at the larger for the FLOPs.
    `depths=None` measures the full model instead (slower, same numbers). Results are cached on
    disk per shape, torch version and source (`perf/activation_cache.py`)."""
    from flowtok_fast.perf import activation_cache

    cfg = model if isinstance(model, FlowTokConfig) else get_config(model)
    key = activation_cache.key(cfg, impl, policy, batches, depths)
    hit = activation_cache.get(key) if cache else None
    if hit is not None:
        return hit
    (b1, b2), depth, layers = batches, cfg.generator.depth, cfg.text_vae.layers
    group = "none" if policy == "none" else "full"  # what the VAE layers do under `policy`

    def at(d, e, impl, policy):
        c = _with_depths(cfg, d, e)
        m1, m2 = measure(c, impl, policy, b1, backward=False), measure(c, impl, policy, b2)
        per_sample = (m2["live_bytes"] - m1["live_bytes"]) / (b2 - b1)
        return {"per_sample": per_sample, "const": m1["live_bytes"] - per_sample * b1,
                "train_flops_per_sample": m2["total_flops"] / b2, "forward_flops_per_sample": m2["forward_flops"] / b2}

    if depths is None:
        base = at(depth, layers, impl, policy)
        out = {**base, **{k + "_per_block": 0.0 for k in base}}
    else:
        d1, d2 = depths
        base, deeper = at(d1, d1, impl, policy), at(d2, d1, impl, policy)
        vae_base, wider = at(d1, d1, "reference", group), at(d1, d2, "reference", group)
        out = {}
        for k in base:
            per_block = (deeper[k] - base[k]) / (d2 - d1)
            per_layer = (wider[k] - vae_base[k]) / (d2 - d1)
            out[k] = base[k] + (depth - d1) * per_block + (layers - d1) * per_layer
            out[k + "_per_block"] = per_block
    if cache:
        activation_cache.put(key, out)
    return out


# ------------------------------------------------------------------ arithmetic


def state_bytes(params: int, sharding: str, gpus: int, ema: bool = True) -> dict[str, float]:
    """fp32 training state per GPU: whole under DDP, 1/gpus of it under FSDP2."""
    if sharding not in SHARDINGS:
        raise UserError(f"unknown sharding '{sharding}': expected one of {SHARDINGS}")
    share = 1 / gpus if sharding == "fsdp2" else 1.0
    return {k: params * b * share for k, b in STATE_BYTES.items() if ema or k != "ema"}


def memory_per_gpu(*, params: int, block_params: int, batch: int, act_per_sample: float, act_const: float,
                   working_per_sample: float, sharding: str, gpus: int, reserve_bytes: float,
                   ema: bool = True) -> dict[str, float]:
    """Bytes per GPU by component, and their total."""
    parts = state_bytes(params, sharding, gpus, ema)
    if sharding == "fsdp2":
        parts["gathered_blocks"] = 2 * block_params * 4  # current + prefetched, fp32
    parts["activations"] = act_const + act_per_sample * batch
    parts["recompute_working"] = working_per_sample * batch
    parts["reserve"] = reserve_bytes
    parts["total"] = sum(parts.values())
    return parts


def max_batch(budget: float, fixed: float, per_sample: float) -> int:
    return max(0, int((budget - fixed) // per_sample)) if per_sample > 0 else 0


def _param_counts(cfg: FlowTokConfig) -> tuple[int, int]:
    with torch.device("meta"):
        from flowtok_fast.models.generator import FlowTokGenerator

        gen = FlowTokGenerator(cfg.generator, cfg.text_vae)
    total = sum(p.numel() for p in gen.parameters() if p.requires_grad)
    block = sum(p.numel() for p in gen.blocks[0].parameters())
    return total, block


def _check(option: str, value, minimum, integer: bool = True, strict: bool = False) -> None:
    """A UserError naming the option when `value` is out of range (or not finite)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{option}: got {value!r}; expected {kind} {'>' if strict else '>='} {minimum:g}")


def plan(model: str = "H", global_batch: int = 8192, gpus: int = 8, gpu_mem_gb: float | None = None,
         impls=("reference", "triton"), shardings=SHARDINGS, policies=tuple(POLICIES),
         max_extra_flops: float = 0.10, reserve_gb: float = 4.0, ema: bool = True, progress: bool = False) -> dict:
    """Every (ops, sharding, policy) at the per-GPU batch, and the cheapest that fits in
    `gpu_mem_gb` GiB per GPU (required: 80 for an H100, ~139 for an H200)."""
    if gpu_mem_gb is None:
        raise UserError("--gpu-mem: missing; expected the GiB per GPU (e.g. 80 for an H100, 139 for an H200)")
    _check("--global-batch", global_batch, 1)
    _check("--gpus", gpus, 1)
    _check("--gpu-mem", gpu_mem_gb, 0, integer=False, strict=True)
    _check("--reserve", reserve_gb, 0, integer=False)
    _check("--max-extra-flops", max_extra_flops, 0, integer=False)
    if global_batch % gpus:
        raise UserError(f"--global-batch: {global_batch} is not divisible by --gpus {gpus}; "
                        "expected a multiple of the GPU count")
    for option, given, known in (("--ops", impls, ops.IMPLS), ("--sharding", shardings, SHARDINGS),
                                 ("policies", policies, tuple(POLICIES))):
        if not given or any(g not in known for g in given):
            raise UserError(f"{option}: got {list(given)}; expected one or more of {list(known)}")
    cfg = model if isinstance(model, FlowTokConfig) else get_config(model)
    batch, budget = global_batch // gpus, gpu_mem_gb * GIB
    params, block_params = _param_counts(cfg)
    needed = [(impl, p) for impl in impls for p in dict.fromkeys(("none", *policies))]
    bar = tqdm(needed, desc=f"measuring FlowTok-{cfg.name} activations", unit="policy", disable=not progress,
               file=sys.stderr, leave=False)
    measured = {(impl, p): activation_model(cfg, impl, p) for impl, p in bar}
    rows = []
    for impl in impls:
        base = measured[(impl, "none")]
        # a recomputed block re-materialises its activations in backward: one block's share
        block_bytes = base["per_sample_per_block"] or base["per_sample"] / cfg.generator.depth
        for policy in policies:
            a = measured[(impl, policy)]
            extra = a["train_flops_per_sample"] / base["train_flops_per_sample"] - 1
            working = 0.0 if policy == "none" else block_bytes
            for sharding in shardings:
                mem = memory_per_gpu(params=params, block_params=block_params, batch=batch,
                                     act_per_sample=a["per_sample"], act_const=a["const"],
                                     working_per_sample=working, sharding=sharding, gpus=gpus,
                                     reserve_bytes=reserve_gb * GIB, ema=ema)
                per_sample = a["per_sample"] + working
                rows.append({
                    "ops": impl, "sharding": sharding, "policy": policy,
                    "act_mib_per_sample": a["per_sample"] / 2**20,
                    "extra_flops": extra,
                    "total_gib": mem["total"] / GIB,
                    "fits": mem["total"] <= budget,
                    "max_batch": max_batch(budget, mem["total"] - per_sample * batch, per_sample),
                    "memory_gib": {k: v / GIB for k, v in mem.items()},
                })
    fitting = [r for r in rows if r["fits"]]
    cheapest = min(fitting, key=lambda r: (r["extra_flops"], r["total_gib"])) if fitting else None
    within = [r for r in rows if r["extra_flops"] <= max_extra_flops + 1e-9]
    best_within = min(within, key=lambda r: r["total_gib"]) if within else None
    return {
        "model": cfg.name, "global_batch": global_batch, "gpus": gpus, "per_gpu_batch": batch,
        "gpu_mem_gib": gpu_mem_gb, "reserve_gib": reserve_gb, "ema": ema, "params": params,
        "max_extra_flops": max_extra_flops, "rows": rows, "choice": cheapest, "best_within_flops": best_within,
        "target_met": bool(best_within and best_within["fits"]),
        "method": "activations measured on fake tensors (FakeTensorMode, CPU dispatch, bf16 autocast), "
                  "batches 2 and 4 at generator and text-VAE depths 1 and 2, affine fit to the full depths",
    }


def format_plan(p: dict) -> str:
    lines = [f"FlowTok-{p['model']}: global batch {p['global_batch']} on {p['gpus']} GPUs = {p['per_gpu_batch']} "
             f"per GPU, {p['gpu_mem_gib']:g} GiB each ({p['reserve_gib']:g} GiB reserve), "
             f"{p['params'] / 1e6:.1f}M trainable parameters, EMA {'on' if p['ema'] else 'off'}",
             f"{'ops':>9} {'shard':>5} {'policy':>9} {'act MiB/sample':>14} {'+FLOPs':>7} {'GiB/GPU':>8} {'fits':>4} {'max batch':>9}"]
    for r in p["rows"]:
        lines.append(f"{r['ops']:>9} {r['sharding']:>5} {r['policy']:>9} {r['act_mib_per_sample']:14.2f} "
                     f"{100 * r['extra_flops']:6.1f}% {r['total_gib']:8.1f} {'yes' if r['fits'] else 'no':>4} {r['max_batch']:9d}")
    c, w = p["choice"], p["best_within_flops"]
    if c:
        lines.append(f"choice: {c['ops']} ops, {c['sharding']}, recompute '{c['policy']}': {c['total_gib']:.1f} GiB "
                     f"per GPU, +{100 * c['extra_flops']:.1f}% FLOPs")
    else:
        lines.append("choice: nothing fits at this per-GPU batch; use gradient accumulation (see max batch)")
    if w and not p["target_met"]:
        fit = f"fits at micro-batch {w['max_batch']}" if w["max_batch"] else "fixed costs alone exceed the budget"
        lines.append(f"within +{100 * p['max_extra_flops']:.0f}% FLOPs the smallest is {w['ops']}/{w['sharding']}/"
                     f"'{w['policy']}' at {w['total_gib']:.1f} GiB: {w['total_gib'] - p['gpu_mem_gib']:.1f} GiB over "
                     f"(activations alone {w['memory_gib']['activations']:.1f} GiB); {fit}")
    lines.append(f"method: {p['method']}")
    return "\n".join(lines)


def local_gpu_gib() -> float | None:
    """This machine's first CUDA GPU's memory in GiB, or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def main(argv=None) -> int:
    ap = OneLineParser(prog="flowtok-fast plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="H", help="tiny or a generator size S/B/L/XL/H")
    ap.add_argument("--global-batch", type=int, default=8192)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=None,
                    help="GiB per GPU, e.g. 80 (H100) or 139 (H200); default: this machine's GPU (required without one)")
    ap.add_argument("--max-extra-flops", type=float, default=0.10, help="recompute budget, fraction of training FLOPs")
    ap.add_argument("--reserve", type=float, default=4.0, help="GiB kept for CUDA context, fragmentation, transients")
    ap.add_argument("--ops", nargs="+", default=["reference", "triton"], choices=ops.IMPLS)
    ap.add_argument("--sharding", nargs="+", default=list(SHARDINGS), choices=SHARDINGS)
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="measure again instead of reading the activation cache")
    ap.add_argument("--json", help="also write the plan here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `flowtok-fast plan -- ...` passes the "--"
    if args.json:
        from flowtok_fast.validate import check_output_file

        check_output_file(args.json, "--json")  # before the plan is computed
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else local_gpu_gib()
    if args.no_cache:
        os.environ["FLOWTOK_CACHE_DIR"] = os.devnull  # unreadable, unwritable: every model measured
    try:
        get_config(args.model)
    except (KeyError, ValueError) as e:
        raise UserError(f"--model: {e}") from None
    p = plan(args.model, args.global_batch, args.gpus, gpu_mem, tuple(args.ops), tuple(args.sharding),
             max_extra_flops=args.max_extra_flops, reserve_gb=args.reserve, ema=not args.no_ema, progress=True)
    print(format_plan(p))
    if args.json:
        write_json_atomic(args.json, p)
    return 0


def write_json_atomic(path, obj) -> None:
    """JSON written to a temporary file beside `path`, then renamed: never half-written."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".json.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
