"""Fused attention for the DiT core: Triton forward and backward, PyTorch reference, dispatcher.

``attention(q, k, v)`` computes ``softmax(q kᵀ · scale) v`` for q, k, v shaped (B, H, S, D),
the layout of ``torch.nn.functional.scaled_dot_product_attention``.

The Triton kernels follow FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning", arXiv:2307.08691):

* forward: one program per (query block, batch·head) streams key/value blocks through an
  online softmax (running max ``m``, running sum ``l``, rescaled accumulator), never writing
  the S×S score matrix; it saves the row log-sum-exp ``L = m + log l`` for the backward.
* backward: recomputes ``P = exp(q kᵀ · scale − L)`` block by block from the saved ``L``
  (no stored probabilities), with ``Δ = rowsum(dO ∘ O)`` (a small kernel of its own) and
  ``dS = P ∘ (dO vᵀ − Δ)``:
  ``dV = Pᵀ dO``, ``dK = dSᵀ q · scale``, ``dQ = dS k · scale``. One program per key block
  accumulates dK, dV over the query blocks; dQ comes from a second kernel looping over key
  blocks, or, when one key block spans the whole sequence, from the same program.

DiT sequences are short (16 to 256 tokens), so the tiling heuristic takes the whole
sequence in one program when it fits (forward: up to 128 queries and 128 keys; backward:
up to 128 keys, 64 at head dim 128, so dQ needs no second kernel) instead of the 4k-token
LLM tiles.
Sequences of any length work (the tails are masked), head dims up to 128 (padded to the
next power of two, at least 16, and masked), causal masking is an option. Inputs are
fp16/bf16 on GPU with fp32 accumulation (``auto`` sends fp32 to SDPA: fp32 tiles of this
size spill registers or overflow shared memory). Under ``TRITON_INTERPRET=1`` fp32 and
float64 run too (tests, ``gradcheck``), and 16-bit operands are upcast before ``tl.dot``,
which the interpreter gets wrong on bf16.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import (check_float_dtype, compute_dtype, new_output, next_pow2, resolve_backend,
                        tl, triton, triton_interpreting)

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is the fast path


#################################################################################
#                                 Triton kernels                                #
#################################################################################

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    H, S, D, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head) against every key (online softmax)."""
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: big batches of strided views overflow int32
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)  # running row max of the scores (base 2)
    l_i = tl.zeros([BLOCK_M], ACC)                # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < S
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)).to(ACC) * qk_scale
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        # Key 0 is in the first block and visible to every row, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(ACC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :],
             out, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * S + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, sos, sdob, sdoh, sdos, H, S, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Δ = rowsum(dO ∘ O) once per query row, so the backward kernels need not hold O."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + pid_bh * S + offs_m, tl.sum(o.to(ACC) * do.to(ACC), 1), mask=offs_m < S)


@triton.jit
def _attn_probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, S, qk_scale,
                            CAUSAL: tl.constexpr, ACC: tl.constexpr):
    """Recompute one block of P from the saved log-sum-exp, and dS = P ∘ (dO vᵀ − Δ)."""
    s = tl.dot(q, tl.trans(k)).to(ACC) * qk_scale
    p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
    keep = (offs_m[:, None] < S) & (offs_n[None, :] < S)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v)).to(ACC)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
    H, S, D, sm_scale, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, WRITE_DQ: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N keys of one (batch, head), looping over query blocks.

    With WRITE_DQ (one key block covers the whole sequence) it also writes dQ for every
    query block, since each dQ row then needs only this program's keys.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)

    lo = 0
    if CAUSAL:  # queries before this key block see none of its keys
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, S, BLOCK_M):
        offs_m = start_m + offs_mb
        m_ok = offs_m < S
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :],
                     mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + pid_bh * S + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * S + offs_m, mask=m_ok, other=0.0)
        p, ds = _attn_probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, S, qk_scale,
                                        CAUSAL, ACC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(ACC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(ACC)
        if WRITE_DQ:
            dq = tl.dot(ds.to(k.dtype), k).to(ACC) * sm_scale
            tl.store(DQ + pid_bh * S * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=q_mask)

    out = pid_bh * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk * sm_scale, mask=kv_mask)
    tl.store(DV + out, dv, mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
    H, S, D, sm_scale, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries of one (batch, head), looping over key blocks."""
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: big batches of strided views overflow int32
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < S
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * S + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * S + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        _, ds = _attn_probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, S, qk_scale,
                                        CAUSAL, ACC)
        dq += tl.dot(ds.to(k.dtype), k).to(ACC)
    tl.store(DQ + pid_bh * S * D + offs_m[:, None] * D + offs_d[None, :], dq * sm_scale, mask=q_mask)


#################################################################################
#                        Tiling heuristic and launchers                         #
#################################################################################

class AttnBlocks(NamedTuple):
    block_m: int   # queries per program (forward and dQ)
    block_n: int   # keys per program (dK/dV) and per inner step (forward and dQ)
    num_warps: int


def attention_blocks(S: int, D: int, backward: bool = False) -> AttnBlocks:
    """Tile sizes for sequence length S and head dim D (no autotuning: it needs a GPU).

    Short DiT sequences take the whole sequence in one program. The sizes were chosen so
    that no kernel spills registers when compiled for sm_90 (checked with ptxas without a
    GPU); the backward program holds dK and dV for its keys, so its query tiles are smaller.
    """
    s2, d2 = max(16, next_pow2(S)), max(16, next_pow2(D))
    if backward:
        bm = min(s2, 64 if d2 <= 32 else 32)
        bn = min(s2, 64 if d2 > 64 else 128)
        return AttnBlocks(bm, bn, 8 if bn >= 64 and bm * bn >= 2048 else 4)
    bm, bn = min(s2, 128), min(s2, 64 if d2 > 64 else 128)
    return AttnBlocks(bm, bn, 4 if bm * bn <= 64 * 64 else 8)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _kernel_flags(q: torch.Tensor):
    """(accumulator dtype, upcast 16-bit operands before tl.dot: only in the interpreter)."""
    upcast = triton_interpreting(_attn_fwd_kernel) and q.dtype in (torch.float16, torch.bfloat16)
    return compute_dtype(q.dtype), upcast


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_fwd(q, k, v, causal: bool, sm_scale: float, blocks: AttnBlocks | None):
    B, H, S, D = q.shape
    cfg = blocks or attention_blocks(S, D)
    acc, upcast = _kernel_flags(q)
    o = new_output((B, H, S, D), q.dtype, q.device)
    lse = new_output((B, H, S), torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
    # batch·head on grid axis 0: CUDA allows 2³¹−1 programs there but only 65535 on axis 1.
    grid = (B * H, triton.cdiv(S, cfg.block_m))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, S, D, sm_scale * LOG2E,
        CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=max(16, next_pow2(D)),
        ACC=acc, UPCAST=upcast, num_warps=cfg.num_warps)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal: bool, sm_scale: float, blocks: AttnBlocks | None):
    B, H, S, D = q.shape
    cfg = blocks or attention_blocks(S, D, backward=True)
    acc, upcast = _kernel_flags(q)
    do = _last_dim_contiguous(do)
    dq = new_output((B, H, S, D), q.dtype, q.device)
    dk = new_output((B, H, S, D), k.dtype, q.device)
    dv = new_output((B, H, S, D), v.dtype, q.device)
    n_kv = triton.cdiv(S, cfg.block_n)
    common = dict(CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_D=max(16, next_pow2(D)), ACC=acc, UPCAST=upcast, num_warps=cfg.num_warps)
    delta = new_output((B, H, S), lse.dtype, q.device)
    _attn_bwd_delta_kernel[(B * H, triton.cdiv(S, cfg.block_m))](
        o, do, delta, *_strides(o), *_strides(do), H, S, D,
        BLOCK_M=cfg.block_m, BLOCK_D=common["BLOCK_D"], ACC=acc, num_warps=4)
    ptr_args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _attn_bwd_dkdv_kernel[(B * H, n_kv)](
        q, k, v, do, lse, delta, dq, dk, dv, *ptr_args, H, S, D, sm_scale, sm_scale * LOG2E,
        WRITE_DQ=n_kv == 1, **common)
    if n_kv > 1:
        _attn_bwd_dq_kernel[(B * H, triton.cdiv(S, cfg.block_m))](
            q, k, v, do, lse, delta, dq, *ptr_args, H, S, D, sm_scale, sm_scale * LOG2E, **common)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper over the Triton kernels; saves q, k, v, O and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, blocks: AttnBlocks | None):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _flash_fwd(q, k, v, causal, sm_scale, blocks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale, ctx.blocks = causal, sm_scale, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, ctx.blocks)
        return dq, dk, dv, None, None, None


#################################################################################
#                       Reference, Triton entry, dispatcher                     #
#################################################################################

def attention_reference(q, k, v, causal: bool = False, sm_scale: float | None = None,
                        return_lse: bool = False):
    """Plain PyTorch ``softmax(q kᵀ · scale) v`` in the input dtype (tests run it in float64)."""
    S, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def attention_triton(q, k, v, causal: bool = False, sm_scale: float | None = None,
                     blocks: AttnBlocks | None = None):
    """The Triton path with no fallback; ``blocks`` overrides the tiling (tests use it)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return FlashAttention.apply(q, k, v, bool(causal), scale, blocks)


def _unsupported(q, k, v) -> str | None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return f"q, k, v must share one (B, H, S, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.numel() == 0:
        return "empty input"
    # On GPU the kernels target the 16-bit tensor-core path; fp32 (and float64 for gradcheck)
    # run in the interpreter only, and ``auto`` sends fp32 on GPU to SDPA.
    return check_float_dtype(q, triton_interpreting(_attn_fwd_kernel), gpu_dtypes=(torch.float16, torch.bfloat16))


def attention(q, k, v, causal: bool = False, sm_scale: float | None = None, backend: str = "auto"):
    """Scaled dot-product attention over (B, H, S, D) tensors.

    ``backend="auto"`` runs the Triton kernel on CUDA (fp16/bf16, head dim ≤ 128) and
    ``F.scaled_dot_product_attention`` otherwise; ``"triton"`` and ``"torch"`` force one.
    ``sm_scale`` defaults to ``1/sqrt(D)``.
    """
    which = resolve_backend(backend, "attention", _attn_fwd_kernel, (q, k, v), _unsupported(q, k, v))
    if which == "torch":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)
    return attention_triton(q, k, v, causal, sm_scale)
