"""`--mode auto|eager|compile|graph|reduce-overhead`: which sampler runs the flow (and, outside eager,
whether the decoder is compiled), one rule for every verb with a sampler and the server (generate,
caption, serve, evaluate t2i and i2t call it). auto picks by a rule written from measurements
(docs/PERFORMANCE.md, "CPU inference" and its second pass), and says why in one printed line, like
`--dtype auto`:

    CUDA             graph: the compiled forward and the whole N-step loop as ONE CUDA graph (no
                     per-step launches; not measured in this change: no GPU, the GPU suite's
                     compiled-graph row measures it)
    CPU, bf16        compile: Inductor with frozen bf16 weights, the flow and the decoder (flow:
                     1.65x eager bf16 at tiny, 1.27x at B; decoder 1.19x at B), where the CPU has
                     native bf16 (or oneDNN is not capped below it: ONEDNN_MAX_CPU_ISA)
    CPU, fp32        compile: Inductor with frozen weights and the linears on oneDNN instead of
                     MKL (onednn_linear.py; B: flow 1.88x, decoder 2.03x eager fp32; tiny 1.29x,
                     1.53x); eager where torch has no oneDNN (then compiled = eager within 2%:
                     MKL's GEMMs are ~90% of the time). The line says `--dtype bf16` is faster on a
                     CPU with native bf16

The rule never picks a mode that lost to eager in the same dtype on the CPUs we measured
("compiled must never lose to eager"). An exported package (`--package`) is not a sampler mode: it
needs a directory made by `flowtok-fast export`, so auto does not pick it.
"""
from __future__ import annotations

import torch

from flowtok_fast import onednn_linear
from flowtok_fast.deploy import dtype as precision
from flowtok_fast.errors import UserError
from flowtok_fast.fast_sampler import MODES

SAMPLER_MODES = MODES
CHOICES = ("auto",) + SAMPLER_MODES


def resolve_mode(choice: str, device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """(sampler mode, why) for `choice` on `device` running in `dtype`; `why` is the line to print."""
    if choice not in CHOICES:
        raise UserError(f"--mode: expected one of {CHOICES}, got {choice!r}")
    device = torch.device(device)
    if choice != "auto":
        return choice, f"mode {choice} (as asked)"
    if device.type == "cuda":
        return "graph", "mode auto -> graph (CUDA: the compiled forward, the whole loop as one CUDA graph)"
    if device.type != "cpu":
        return "eager", f"mode auto -> eager (no measured rule for {device.type})"
    if dtype == torch.bfloat16:
        if precision.cpu_has_native_bf16():
            return "compile", "mode auto -> compile (CPU, bf16: Inductor with frozen bf16 weights beats eager)"
        return "eager", ("mode auto -> eager (CPU, bf16 without native bf16: emulated matmuls dominate, "
                         "compiling gains nothing; fp32 is faster here)")
    hint = "; --dtype bf16 is faster on this CPU (native bf16)" if precision.cpu_has_native_bf16() else ""
    if onednn_linear.available():
        return "compile", f"mode auto -> compile (CPU, fp32: Inductor with frozen weights, linears on oneDNN{hint})"
    return "eager", f"mode auto -> eager (CPU, fp32 without oneDNN: compiling gains nothing over MKL's GEMMs{hint})"
