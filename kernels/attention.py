"""Fused 2-D RoPE + flash attention over the packed qkv tensor, forward and backward.

Layout (REFERENCE.md sections 1 and 5): ``qkv`` is the qkv Linear's output viewed as
``[B, N, 3, H, hd]`` (rows ``[q | k | v]``, heads contiguous). The kernels read q, k and v
straight from it with strides and write the output directly as ``[B, N, H*hd]``, the layout the
``proj`` Linear consumes, so no transposed copies are made on either side.

RoPE (tokenizer only): ``rope_cos`` / ``rope_sin`` are ``[R, hd]`` tables for the first R tokens
(the g*g image patches); q and k of those tokens are rotated over adjacent channel pairs inside
the kernels, the remaining tokens are not rotated. Without tables (generator) it is plain
attention. Scale is ``hd**-0.5``, no mask.

Algorithm: FlashAttention-2. The forward keeps an online softmax in fp32 and saves the
logsumexp (natural log, [B, H, N] fp32); no N x N matrix is ever stored. The backward
recomputes P from q, k and the logsumexp, with delta = rowsum(dO * O) from a small
preprocessing kernel, in two kernels: one owns a block of keys and accumulates dk, dv over all
queries; the other owns a block of queries and accumulates dq over all keys (no atomics, so the
result is deterministic). The RoPE backward (the transposed rotation) is applied to dq and dk
before they are stored into the gradient of the packed qkv tensor.

Public API: ``attention`` (the ``flowtok::attention_fwd`` / ``flowtok::attention_bwd`` custom
ops with autograd), ``attention_ref`` / ``apply_rope_ref`` (plain PyTorch; also the models'
CPU path). tests/kernels/gpu_compile.py compiles the variants the launchers really launch.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, new_empty, next_pow2, round_to

# Softmax runs in base 2 (exp2 is the native instruction): scores * log2(e), lse back * ln(2).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Dot products (DOT_LOWP, set for bf16 / fp16 inputs): the operands, P and dS included, are
# rounded to the input dtype and multiplied with fp32 accumulation, as FlashAttention does. On GPU
# they go to tl.dot in that dtype (tensor cores). The interpreter's 16-bit dot is wrong, so there
# _dot_operand rounds them to the same 16-bit values (to nearest, as the GPU) and multiplies in
# fp32: products of 16-bit numbers are exact in fp32, so CI sees the GPU's numerics. fp32 inputs
# use input_precision="ieee", exact instead of TF32.
_EMULATE_LOWP_DOT = tl.constexpr(interpreting())

# Tests set this to True to run the GPU's launch parameters (64-wide tiles, the backward's
# 32-query steps) in the interpreter, where the default is 32-wide tiles.
GPU_LAUNCH_IN_INTERPRETER = False

# Dtypes the kernels take for qkv (the reference also takes float64, for exact baselines).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _store_cast(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast an fp32 result to the output dtype. The interpreter's fp32 -> bf16 cast truncates;
    with ROUND_BF16 (interpreter only) x is first rounded to the nearest bf16, ties to even,
    with integer ops, so the cast is exact. GPUs round correctly on their own."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot_operand(x, dot_dtype: tl.constexpr):
    """An fp32 tile as a tl.dot operand of dtype dot_dtype (see the top of the file)."""
    if _EMULATE_LOWP_DOT and dot_dtype != tl.float32:
        return round_to(x, dot_dtype).to(tl.float32)
    return x.to(dot_dtype)


@triton.jit
def _tile_ptrs(base, offs_n, offs_d, stride_n, ALIGNED: tl.constexpr):
    """Pointers of a [rows, BLOCK_D] tile. With ALIGNED (checked by the launcher: base pointers
    and strides are multiples of 16 bytes) every row starts 16-byte aligned, which lets the
    compiler use 16-byte vector loads and stores even where it cannot see the launch values."""
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :]
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [1, 16])
    return ptrs


@triton.jit
def _load_rows(base, offs_n, offs_d, stride_n, N, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """A [rows, BLOCK_D] tile of one head, rows >= N and padded channels read as 0, in fp32."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(_tile_ptrs(base, offs_n, offs_d, stride_n, ALIGNED), mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_rows(base, x, offs_n, offs_d, stride_n, N, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr,
                ROUND_BF16: tl.constexpr):
    """Store the valid rows and channels of an fp32 tile in the pointer's dtype."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    tl.store(_tile_ptrs(base, offs_n, offs_d, stride_n, ALIGNED),
             _store_cast(x, base.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def _rotate_half(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pairs (2k, 2k+1) -> (-x[2k+1], x[2k]) along the channel axis, in registers."""
    even, odd = tl.split(tl.reshape(x, [ROWS, BLOCK_D // 2, 2]))
    return tl.reshape(tl.join(-odd, even), [ROWS, BLOCK_D])


@triton.jit
def _load_tables(cos_ptr, sin_ptr, offs_n, offs_d, R, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """cos/sin rows for these tokens; tokens >= R get cos 1, sin 0, i.e. no rotation."""
    mask = (offs_n[:, None] < R) & (offs_d[None, :] < HEAD_DIM)
    cos = tl.load(_tile_ptrs(cos_ptr, offs_n, offs_d, HEAD_DIM, ALIGNED), mask=mask, other=1.0)
    sin = tl.load(_tile_ptrs(sin_ptr, offs_n, offs_d, HEAD_DIM, ALIGNED), mask=mask, other=0.0)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _rope(x, cos_ptr, sin_ptr, offs_n, offs_d, R,
          HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """x * cos + rotate_half(x) * sin for the tokens < R of this tile."""
    cos, sin = _load_tables(cos_ptr, sin_ptr, offs_n, offs_d, R, HEAD_DIM, ALIGNED)
    return x * cos + _rotate_half(x, ROWS, BLOCK_D) * sin


@triton.jit
def _rope_transpose(g, cos_ptr, sin_ptr, offs_n, offs_d, R, HEAD_DIM: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Gradient through the rotation: g * cos - rotate_half(g * sin) (rotate_half^T = -rotate_half).
    Exact for any tables; with the usual pair-repeated sin it equals g*cos - rotate_half(g)*sin."""
    cos, sin = _load_tables(cos_ptr, sin_ptr, offs_n, offs_d, R, HEAD_DIM, ALIGNED)
    return g * cos - _rotate_half(g * sin, ROWS, BLOCK_D)


@triton.jit
def _load_qk(base, offs_n, offs_d, stride_n, N, cos_ptr, sin_ptr, R, start,
             HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
             HAS_ROPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A q or k tile in fp32, rotated when it holds image tokens (the scalar branch skips the
    table loads for blocks entirely past R: latent/text tokens and the generator)."""
    x = _load_rows(base, offs_n, offs_d, stride_n, N, HEAD_DIM, ALIGNED)
    if HAS_ROPE:
        if start < R:
            x = _rope(x, cos_ptr, sin_ptr, offs_n, offs_d, R, HEAD_DIM, ROWS, BLOCK_D, ALIGNED)
    return x


@triton.jit
def _block_and_head(N, BLOCK: tl.constexpr):
    """(block index, batch*head index) from a 1-D grid. The blocks of one (batch, head) are
    adjacent, so they run together and share its k / v in cache; a 1-D grid also has no 65535
    limit on B * H."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    return pid % num_blocks, pid // num_blocks


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, cos_ptr, sin_ptr, offs_d,
               start, end, N, R, stride_n, qk_scale, dot_dtype: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               ROTATE: tl.constexpr, ALIGNED: tl.constexpr):
    """Online-softmax update over the key blocks in [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_n, N, HEAD_DIM, ALIGNED)
        if ROTATE:
            k = _rope(k, cos_ptr, sin_ptr, offs_n, offs_d, R, HEAD_DIM, BLOCK_N, BLOCK_D, ALIGNED)
        k = _dot_operand(k, dot_dtype)
        v = _load_rows(v_base, offs_n, offs_d, stride_n, N, HEAD_DIM, ALIGNED)
        v = _dot_operand(v, dot_dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))  # keys past the end
        # Key 0 is always valid, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_dot_operand(p, dot_dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    qkv_ptr, cos_ptr, sin_ptr, out_ptr, lse_ptr,
    N, R, H, qk_scale,
    stride_qkv_b, stride_qkv_n, stride_qkv_s,
    stride_out_b, stride_out_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, DOT_LOWP: tl.constexpr,
    ROUND_BF16: tl.constexpr, ALIGNED: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head); loops over all keys.
    pid_m, pid_bh = _block_and_head(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    # 64-bit batch offset: B * N * 3 * H * hd can pass 2**31 at large batches.
    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    k_base = q_base + stride_qkv_s
    v_base = q_base + 2 * stride_qkv_s
    dot_dtype: tl.constexpr = qkv_ptr.dtype.element_ty if DOT_LOWP else tl.float32  # see top

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_qk(q_base, offs_m, offs_d, stride_qkv_n, N, cos_ptr, sin_ptr, R, start_m,
                 HEAD_DIM, BLOCK_M, BLOCK_D, HAS_ROPE, ALIGNED)
    q = _dot_operand(q, dot_dtype)

    # Online softmax in base 2: scores are multiplied by qk_scale = hd**-0.5 * log2(e). Keys of
    # image tokens (blocks below R) are rotated; the rest run in a loop without table loads.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rope_end = 0
    if HAS_ROPE:
        rope_end = tl.cdiv(R, BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, cos_ptr, sin_ptr, offs_d,
                                   0, rope_end, N, R, stride_qkv_n, qk_scale, dot_dtype,
                                   HEAD_DIM, BLOCK_N, BLOCK_D, True, ALIGNED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, cos_ptr, sin_ptr, offs_d,
                               rope_end, N, N, R, stride_qkv_n, qk_scale, dot_dtype,
                               HEAD_DIM, BLOCK_N, BLOCK_D, False, ALIGNED)

    out_base = out_ptr + b.to(tl.int64) * stride_out_b + h * HEAD_DIM
    _store_rows(out_base, acc / l_i[:, None], offs_m, offs_d, stride_out_n, N, HEAD_DIM,
                ALIGNED, ROUND_BF16)
    # logsumexp of the scaled scores, natural log, [B, H, N].
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr,
    N, H,
    stride_out_b, stride_out_n, stride_dout_b, stride_dout_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr,
):
    # delta[b, h, n] = sum_d dO * O, the softmax backward's per-row term (= rowsum(P * dP)).
    pid_m, pid_bh = _block_and_head(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(out_ptr + b.to(tl.int64) * stride_out_b + h * HEAD_DIM,
                   offs_m, offs_d, stride_out_n, N, HEAD_DIM, ALIGNED)
    do = _load_rows(dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM,
                    offs_m, offs_d, stride_dout_n, N, HEAD_DIM, ALIGNED)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _attn_bwd_dkdv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    N, R, H, sm_scale, qk_scale,
    stride_qkv_b, stride_qkv_n, stride_qkv_s,
    stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n, stride_dqkv_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, DOT_LOWP: tl.constexpr,
    ROUND_BF16: tl.constexpr, ALIGNED: tl.constexpr,
):
    # One program: BLOCK_N keys of one (batch, head); loops over all queries. Works on the
    # transposed scores (keys x queries) so that dk and dv come out as plain dot products.
    pid_n, pid_bh = _block_and_head(N, BLOCK_N)
    b = pid_bh // H
    h = pid_bh % H
    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    k_base = q_base + stride_qkv_s
    v_base = q_base + 2 * stride_qkv_s
    do_base = dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM
    row_base = pid_bh.to(tl.int64) * N  # into lse and delta, [B, H, N]
    dot_dtype: tl.constexpr = qkv_ptr.dtype.element_ty if DOT_LOWP else tl.float32  # see top

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_qk(k_base, offs_n, offs_d, stride_qkv_n, N, cos_ptr, sin_ptr, R, start_n,
                 HEAD_DIM, BLOCK_N, BLOCK_D, HAS_ROPE, ALIGNED)
    k = _dot_operand(k, dot_dtype)
    v = _load_rows(v_base, offs_n, offs_d, stride_qkv_n, N, HEAD_DIM, ALIGNED)
    v = _dot_operand(v, dot_dtype)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_qk(q_base, offs_m, offs_d, stride_qkv_n, N, cos_ptr, sin_ptr, R, start_m,
                     HEAD_DIM, BLOCK_M, BLOCK_D, HAS_ROPE, ALIGNED)
        q = _dot_operand(q, dot_dtype)
        do = _load_rows(do_base, offs_m, offs_d, stride_dout_n, N, HEAD_DIM, ALIGNED)
        do = _dot_operand(do, dot_dtype)
        # Padded query rows read lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(lse_ptr + row_base + offs_m, mask=offs_m < N, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + row_base + offs_m, mask=offs_m < N, other=0.0)
        # P^T recomputed from q, k and the saved logsumexp (base 2).
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse[None, :])
        dv += tl.dot(_dot_operand(p_t, dot_dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(_dot_operand(ds_t, dot_dtype), q, input_precision="ieee")

    dk = dk * sm_scale
    if HAS_ROPE:
        if start_n < R:
            dk = _rope_transpose(dk, cos_ptr, sin_ptr, offs_n, offs_d, R,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, ALIGNED)
    dk_base = dqkv_ptr + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM + stride_dqkv_s
    dv_base = dk_base + stride_dqkv_s
    _store_rows(dk_base, dk, offs_n, offs_d, stride_dqkv_n, N, HEAD_DIM, ALIGNED, ROUND_BF16)
    _store_rows(dv_base, dv, offs_n, offs_d, stride_dqkv_n, N, HEAD_DIM, ALIGNED, ROUND_BF16)


@triton.jit
def _attn_bwd_dq_kernel(
    qkv_ptr, cos_ptr, sin_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    N, R, H, sm_scale, qk_scale,
    stride_qkv_b, stride_qkv_n, stride_qkv_s,
    stride_dout_b, stride_dout_n,
    stride_dqkv_b, stride_dqkv_n, stride_dqkv_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, DOT_LOWP: tl.constexpr,
    ROUND_BF16: tl.constexpr, ALIGNED: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head); loops over all keys.
    pid_m, pid_bh = _block_and_head(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    k_base = q_base + stride_qkv_s
    v_base = q_base + 2 * stride_qkv_s
    do_base = dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM
    row_base = pid_bh.to(tl.int64) * N
    dot_dtype: tl.constexpr = qkv_ptr.dtype.element_ty if DOT_LOWP else tl.float32  # see top

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_qk(q_base, offs_m, offs_d, stride_qkv_n, N, cos_ptr, sin_ptr, R, start_m,
                 HEAD_DIM, BLOCK_M, BLOCK_D, HAS_ROPE, ALIGNED)
    q = _dot_operand(q, dot_dtype)
    do = _load_rows(do_base, offs_m, offs_d, stride_dout_n, N, HEAD_DIM, ALIGNED)
    do = _dot_operand(do, dot_dtype)
    lse = tl.load(lse_ptr + row_base + offs_m, mask=offs_m < N, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row_base + offs_m, mask=offs_m < N, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_qk(k_base, offs_n, offs_d, stride_qkv_n, N, cos_ptr, sin_ptr, R, start_n,
                     HEAD_DIM, BLOCK_N, BLOCK_D, HAS_ROPE, ALIGNED)
        k = _dot_operand(k, dot_dtype)
        v = _load_rows(v_base, offs_n, offs_d, stride_qkv_n, N, HEAD_DIM, ALIGNED)
        v = _dot_operand(v, dot_dtype)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])
        # Keys past the end: exp2(-lse) could overflow, so zero them explicitly.
        p = tl.where(offs_n[None, :] < N, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_dot_operand(ds, dot_dtype), k, input_precision="ieee")

    dq = dq * sm_scale
    if HAS_ROPE:
        if start_m < R:
            dq = _rope_transpose(dq, cos_ptr, sin_ptr, offs_m, offs_d, R,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, ALIGNED)
    dq_base = dqkv_ptr + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    _store_rows(dq_base, dq, offs_m, offs_d, stride_dqkv_n, N, HEAD_DIM, ALIGNED, ROUND_BF16)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def _launch_params(head_dim: int, dtype: torch.dtype, has_rope: bool, aligned: bool, *,
                   gpu: bool) -> dict:
    """{kernel: (constexprs, launch options)} for every launch of the forward and backward.

    GPU: 64 x 64 tiles (N = 77 / 154 waste little; 410 / 1178 give enough programs), the head
    dim padded to a power of two with masks (72 -> 128), 16-bit tensor-core dots for 16-bit
    inputs. The dk/dv kernel keeps four [64, BLOCK_D] tiles live (k, v, dk, dv), so it steps
    through the queries 32 at a time, and BLOCK_D = 128 gets 8 warps in the backward: no
    register spills on sm_80 or sm_90.
    Interpreter: 32 x 32 tiles, which keeps the tests fast and makes even N = 77 span several
    blocks (online-softmax rescaling, ragged last block); 16-bit dot operands emulated (see the
    top of the file); bf16 stores rounded to nearest."""
    block_d = max(16, next_pow2(head_dim))
    tile = 64 if gpu else 32
    stages = 2 if gpu else 1
    bwd_warps = 4 if block_d <= 64 else 8
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ALIGNED=aligned)
    modes = dict(
        HAS_ROPE=has_rope,
        DOT_LOWP=dtype != torch.float32,
        ROUND_BF16=interpreting() and dtype == torch.bfloat16,
    )
    fwd_opts = dict(num_warps=4, num_stages=stages)
    bwd_opts = dict(num_warps=bwd_warps, num_stages=stages)
    return {
        "fwd": ({**common, "BLOCK_M": tile, "BLOCK_N": tile, **modes}, fwd_opts),
        "delta": ({**common, "BLOCK_M": tile}, dict(num_warps=4, num_stages=1)),
        "dkdv": ({**common, "BLOCK_M": 32, "BLOCK_N": tile, **modes}, bwd_opts),
        "dq": ({**common, "BLOCK_M": tile, "BLOCK_N": tile, **modes}, bwd_opts),
    }


def _gpu_launch() -> bool:
    return not interpreting() or GPU_LAUNCH_IN_INTERPRETER


def _rows_aligned(hd: int, *tensors: Optional[torch.Tensor]) -> bool:
    """Every tile row the kernels touch starts on a 16-byte boundary: base pointers, a head's
    hd channels and every stride but the channel one are multiples of 16 bytes. Holds for the
    real models (rows of 3*H*hd channels, hd = 64 or 72)."""
    for t in tensors:
        if t is None:
            continue
        size = t.element_size()
        if t.data_ptr() % 16 or (hd * size) % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_inputs(qkv, rope_cos, rope_sin, *, kernel: bool, op: str = "attention") -> None:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"{op}: qkv must be a 5-D tensor [B, N, 3, H, hd], got {got}")
    B, N, _, H, hd = qkv.shape
    if min(B, N, H, hd) == 0:
        raise ValueError(f"{op}: qkv must be non-empty, got shape {tuple(qkv.shape)}")
    allowed = _KERNEL_DTYPES if kernel else _KERNEL_DTYPES + (torch.float64,)
    if qkv.dtype not in allowed:
        raise ValueError(f"{op}: qkv dtype must be one of {[str(d) for d in allowed]}, got {qkv.dtype}")
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError(f"{op}: pass both rope_cos and rope_sin or neither")
    if rope_cos is None:
        return
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t.dim() != 2 or t.shape[1] != hd or not 0 < t.shape[0] <= N:
            raise ValueError(
                f"{op}: {name} must be [R, hd] with 0 < R <= N = {N} and hd = {hd}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a float tensor, got {t.dtype}")
        if t.device != qkv.device:
            raise ValueError(
                f"{op}: {name} must be on the same device as qkv ({qkv.device}), got {t.device}")
    if rope_cos.shape != rope_sin.shape:
        raise ValueError(f"{op}: rope_cos {tuple(rope_cos.shape)} and rope_sin "
                         f"{tuple(rope_sin.shape)} must have the same shape")
    if hd % 2:
        raise ValueError(f"{op}: RoPE rotates channel pairs, so hd must be even, got {hd}")


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take strides for the batch, token and q/k/v axes; within a row the heads and
    channels must be packed ([..., H, hd] or [..., H*hd] with unit channel stride), so head h
    starts at h * hd (a constant the compiler can prove aligned)."""
    hd_stride_ok = t.dim() != 5 or t.stride(3) == t.shape[4]
    if t.stride(-1) == 1 and hd_stride_ok:
        return t
    return t.contiguous()


def _tables(rope_cos, rope_sin, fallback):
    """Table pointers and R; without RoPE any fp32 tensor stands in (never read: HAS_ROPE=False)."""
    if rope_cos is None:
        return fallback, fallback, 0
    return rope_cos.contiguous(), rope_sin.contiguous(), rope_cos.shape[0]


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("flowtok::attention_fwd", mutates_args=())
def attention_fwd(
    qkv: torch.Tensor, rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, N, H*hd] in qkv's dtype, lse [B, H, N] fp32, natural log)."""
    _check_inputs(qkv, rope_cos, rope_sin, kernel=True, op="attention_fwd")
    check_device(qkv, rope_cos, rope_sin, op="attention_fwd")
    qkv = _rows_contiguous(qkv)
    B, N, _, H, hd = qkv.shape
    out = new_empty((B, N, H * hd), like=qkv)
    lse = new_empty((B, H, N), like=qkv, dtype=torch.float32)
    cos, sin, R = _tables(rope_cos, rope_sin, lse)
    aligned = _rows_aligned(hd, qkv, out, *((cos, sin) if R else ()))
    params = _launch_params(hd, qkv.dtype, R > 0, aligned, gpu=_gpu_launch())
    meta, options = params["fwd"]
    _attn_fwd_kernel[(triton.cdiv(N, meta["BLOCK_M"]) * B * H,)](
        qkv, cos, sin, out, lse,
        N, R, H, hd ** -0.5 * LOG2E.value,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1),
        **meta, **options,
    )
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(qkv, rope_cos, rope_sin):
    _check_inputs(qkv, rope_cos, rope_sin, kernel=True, op="attention_fwd")
    B, N, _, H, hd = qkv.shape
    return qkv.new_empty((B, N, H * hd)), qkv.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("flowtok::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gradient of attention_fwd's out w.r.t. the packed qkv, shape [B, N, 3, H, hd]."""
    check_device(dout, qkv, out, lse, rope_cos, rope_sin, op="attention_bwd")
    qkv = _rows_contiguous(qkv)
    dout = _rows_contiguous(dout)
    out = _rows_contiguous(out)
    lse = lse.contiguous()
    B, N, _, H, hd = qkv.shape
    if dout.shape != (B, N, H * hd) or out.shape != dout.shape or lse.shape != (B, H, N):
        raise ValueError(f"attention_bwd: expected dout and out [B, N, H*hd] = {[B, N, H * hd]} and "
                         f"lse {[B, H, N]}, got {list(dout.shape)}, {list(out.shape)}, {list(lse.shape)}")
    delta = new_empty((B, H, N), like=qkv, dtype=torch.float32)
    dqkv = new_empty(qkv.shape, like=qkv)
    cos, sin, R = _tables(rope_cos, rope_sin, lse)
    aligned = _rows_aligned(hd, qkv, out, dout, dqkv, *((cos, sin) if R else ()))
    params = _launch_params(hd, qkv.dtype, R > 0, aligned, gpu=_gpu_launch())
    sm_scale = hd ** -0.5

    meta, options = params["delta"]
    _attn_bwd_delta_kernel[(triton.cdiv(N, meta["BLOCK_M"]) * B * H,)](
        out, dout, delta, N, H,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        **meta, **options,
    )

    args = (
        qkv, cos, sin, dout, lse, delta, dqkv,
        N, R, H, sm_scale, sm_scale * LOG2E.value,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        dout.stride(0), dout.stride(1),
        dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
    )
    # Separate dk/dv and dq passes: no atomics, deterministic gradients.
    meta, options = params["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, meta["BLOCK_N"]) * B * H,)](*args, **meta, **options)
    meta, options = params["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(N, meta["BLOCK_M"]) * B * H,)](*args, **meta, **options)
    return dqkv


@attention_bwd.register_fake
def _attention_bwd_fake(dout, qkv, out, lse, rope_cos, rope_sin):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, rope_cos, rope_sin = inputs
    out, lse = output
    # Only what the backward recomputes from: no scores, no rotated copies.
    ctx.save_for_backward(qkv, out, lse, rope_cos, rope_sin)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse, rope_cos, rope_sin = ctx.saved_tensors
    dqkv = attention_bwd(dout, qkv, out, lse, rope_cos, rope_sin)
    return dqkv, None, None  # the RoPE tables are constants


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def attention(qkv: torch.Tensor, rope_cos: Optional[torch.Tensor] = None,
              rope_sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention over the packed ``qkv [B, N, 3, H, hd]`` with optional RoPE on the first
    R tokens (tables ``[R, hd]``), scale ``hd**-0.5``, no mask. Returns ``[B, N, H*hd]``."""
    _check_inputs(qkv, rope_cos, rope_sin, kernel=True)
    out, _ = attention_fwd(qkv, rope_cos, rope_sin)
    return out


from flowtok_fast import ops  # noqa: E402
from flowtok_fast.ops import apply_rope_ref  # noqa: E402,F401  (one definition, in the Triton-free ops layer)


def attention_ref(qkv: torch.Tensor, rope_cos: Optional[torch.Tensor] = None,
                  rope_sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference (flowtok_fast/ops.py) behind the same input checks as ``attention``."""
    _check_inputs(qkv, rope_cos, rope_sin, kernel=False, op="attention_ref")
    return ops.attention_ref(qkv, rope_cos, rope_sin)
