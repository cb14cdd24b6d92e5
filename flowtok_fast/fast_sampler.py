"""The static-shape sampler: the Euler + CFG loop of `flow.sample` with a fixed batch, step count
and guidance scale, and no host synchronisation inside the loop.

Everything the loop reads is a device tensor made once: the query times [N, rows], dt and the
guidance scale (0-dim), the indicator rows, and static buffers for the state x and the model
input. A step copies x into the 2B-row input, runs the generator once (conditional rows, then
null rows) and updates x in place with the model's ops layer (`ops.cfg_euler_step_`, which
reads dt and scale from device memory). Nothing calls .item() or branches on device data, so:

    mode="eager"            the plain loop (any device)
    mode="compile"          torch.compile (Inductor) of the generator forward (any device)
    mode="graph"            CUDA: the compiled forward (compile=False: the eager one), and the
                            whole N-step loop captured as ONE CUDA graph, replayed per call
    mode="reduce-overhead"  CUDA: torch.compile(mode="reduce-overhead") of the forward instead
                            (Inductor's CUDA graph trees: one graph replay per step)

Under bf16 the linear weights are cast once, up front, and passed with torch.func.functional_call:
autocast would cast the same weights to the same values on every forward (frozen weights never
enter its cache), so results are unchanged and the per-step casts are gone.

On a CPU, mode="compile" freezes the weights (`freeze`, default on for CPU): Inductor then treats
them as constants, folds autocast's casts into bf16 copies made once, and hands the matmuls to
oneDNN with weights prepacked for this CPU (mkldnn._linear_pointwise); fp32 linears, which
Inductor would leave to MKL, go to oneDNN too (onednn_linear.py). Measured (one thread, CPU time,
docs/PERFORMANCE.md "CPU inference"): tiny bf16 1.65x eager vs 1.33x unfrozen; B fp32 1.97x.
Frozen means a snapshot: weights changed after the first call are not seen (build a new sampler).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from flowtok_fast import flow
from flowtok_fast.configs import NUM_TOKENS, TOKEN_CHANNELS
from flowtok_fast.errors import UserError

MODES = ("eager", "compile", "graph", "reduce-overhead")
CUDA_ONLY = ("graph", "reduce-overhead")


def inference_params(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Parameters and buffers of `model` with every nn.Linear weight and bias cast to `dtype`
    (what autocast feeds the matmuls); everything else as is (norms and embeddings stay fp32)."""
    linear = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")}
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {k: (v.detach().to(dtype) if k in linear else v.detach()) for k, v in tensors.items()}


class FastSampler:
    """x = sampler(x0): Euler with CFG from text latents x0 [batch, 77, 16]; fp32 latents out.

    Equals `flow.sample(generator, x0, steps, cfg_scale, "euler", grid)` under the same autocast
    dtype (fp32 on CPU, bf16 on CUDA by default), up to the compiler's reassociation."""

    def __init__(self, generator: nn.Module, batch: int, steps: int = 20, cfg_scale: float = 2.0,
                 grid: str = "reference", mode: str = "compile", dtype: torch.dtype | None = None,
                 compile: bool = True, freeze: bool | None = None):
        if mode not in MODES:
            raise UserError(f"unknown sampler mode '{mode}': expected one of {MODES}")
        device = next(generator.parameters()).device
        if mode in CUDA_ONLY and device.type != "cuda":
            raise UserError(f"sampler mode '{mode}' needs a CUDA device (CUDA graphs); the generator is on {device}")
        self.generator, self.batch, self.steps, self.mode, self.device = generator, batch, steps, mode, device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.guided = cfg_scale != 1.0
        rows = 2 * batch if self.guided else batch
        times, dt = flow.time_grid(steps, grid)
        f32 = dict(dtype=torch.float32, device=device)
        # times in fp64 -> fp32, exactly as flow.cfg_batch does with torch.full
        self.times = torch.tensor(times, dtype=torch.float64).float().to(device)[:, None].expand(steps, rows).contiguous()
        self.dt, self.scale = torch.tensor(dt, **f32), torch.tensor(cfg_scale, **f32)
        self.indicator = torch.cat([torch.zeros(batch), torch.ones(rows - batch)]).long().to(device)
        self.x = torch.zeros(batch, NUM_TOKENS, TOKEN_CHANNELS, **f32)  # the state, updated in place
        self.x_in = torch.zeros(rows, NUM_TOKENS, TOKEN_CHANNELS, **f32)  # model input rows
        self.t = torch.zeros(rows, **f32)  # this step's times: a fixed address for the compiled forward
        self.extra = flow.step_kwargs(generator, rows, dt, device)  # a few-step student's step size
        self.ops = flow._ops_of(generator)
        # freezing needs the weights as module parameters (it folds autocast's casts itself)
        self.freeze = (mode == "compile" and device.type == "cpu") if freeze is None else bool(freeze and mode == "compile")
        cast_up_front = self.dtype != torch.float32 and not self.freeze
        self.params = inference_params(generator, self.dtype) if cast_up_front else None

        forward = self._forward
        if mode == "reduce-overhead":
            # CUDA graph trees copy non-static inputs into the graph on every replay: the cast
            # weights are not nn.Parameters, so say they never move
            for t in (self.params or {}).values():
                torch._dynamo.mark_static_address(t)
            forward = torch.compile(forward, mode="reduce-overhead", dynamic=False)
        elif mode == "compile" or (mode == "graph" and compile):
            forward = torch.compile(forward, dynamic=False)
        self.forward = forward
        self.graph = None
        if mode == "graph":
            self._capture()

    # ---------------------------------------------------------------- the loop

    def _forward(self, x, t, indicator):
        autocast = self.dtype != torch.float32
        # cache off: a cast cached across a CUDA graph capture would outlive its memory
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast, cache_enabled=False):
            if self.params is None:
                return self.generator(x, t, indicator, **self.extra)
            return functional_call(self.generator, self.params, (x, t, indicator), self.extra)

    def _step(self, i: int) -> None:
        b = self.batch
        self.x_in[:b].copy_(self.x)
        if self.guided:
            self.x_in[b:].copy_(self.x)
        self.t.copy_(self.times[i])
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output is consumed
        v = self.forward(self.x_in, self.t, self.indicator)
        if self.guided:
            self.ops.cfg_euler_step_(self.x, v, self.dt, self.scale)
        else:
            self.ops.euler_step_(self.x, v, self.dt)

    def _loop(self) -> None:
        for i in range(self.steps):
            self._step(i)

    def _capture(self) -> None:
        # Warm up on a side stream (compilation, allocator, lazy init), then record the loop.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for i in range(min(2, self.steps)):
                self._step(i)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._loop()

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if tuple(x0.shape) != tuple(self.x.shape):
            raise UserError(f"this sampler was built for x0 of shape {tuple(self.x.shape)}, got {tuple(x0.shape)}")
        self.x.copy_(x0)
        if self.graph is not None:
            self.graph.replay()
        elif self.freeze:
            with _frozen():
                self._loop()
        else:
            self._loop()
        return self.x.clone()


def cached(cache: dict, generator: nn.Module, batch: int, opts, mode: str, dtype: torch.dtype) -> FastSampler:
    """The static sampler for (batch, steps, scale, grid) of `opts` (SamplingOptions), built once into
    `cache` (a pipeline's or captioner's) and reused."""
    key = (batch, opts.steps, opts.cfg_scale, opts.grid)
    if key not in cache:
        cache[key] = FastSampler(generator, batch, opts.steps, opts.cfg_scale, opts.grid, mode, dtype)
    return cache[key]


def _frozen():
    """Context for running a compiled CPU program: Inductor's freezing on and fp32 linears on
    oneDNN. Both are read by Dynamo when it traces (the first call, and any recompile), so they are
    set around the calls (once per sample, not per step) rather than passed as compile options
    (onednn_linear.py: 1.97x at B in fp32)."""
    import contextlib

    import torch._inductor.config as inductor_config

    from flowtok_fast import onednn_linear

    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(freezing=True))
    stack.enter_context(onednn_linear.linears())
    return stack


def decoder(tokenizer: nn.Module, dtype: torch.dtype, compile: bool):
    """latents [B,77,16], CLIP features -> images in [0,1] (fp32), optionally compiled; compiled on a
    CPU, with frozen weights (B bf16: 1.15-1.19x eager; fp32 2.03x, linears on oneDNN; once the flow is compiled the
    decoder is ~40% of a CPU batch, and 90% of a 1-step student's). FlowTokPipeline.decode uses it
    outside eager mode. Call it under torch.no_grad (freezing needs it)."""

    def decode(latents, feats):
        with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return tokenizer.decode(latents, feats).float()

    if not compile:
        return decode
    compiled = torch.compile(decode, dynamic=False)
    on_cpu = next(tokenizer.parameters()).device.type == "cpu"
    if not on_cpu:
        return compiled

    def frozen_decode(latents, feats):
        with _frozen():
            return compiled(latents, feats)

    return frozen_decode
