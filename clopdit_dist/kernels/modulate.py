"""LayerNorm fused with adaLN modulation, and the gated residual: Triton, reference, dispatcher.

The two elementwise pieces around every DiT sub-layer (Peebles & Xie, 2023, "Scalable
Diffusion Models with Transformers", arXiv:2212.09748, adaLN-Zero):

    layernorm_modulate(x, shift, scale) = LayerNorm(x) · (1 + scale) + shift
    gated_residual(x, gate, y)          = x + gate · y

x and y are (B, S, C) token tensors; shift, scale and gate are (B, C), one vector per sample
broadcast over the S tokens (they come from the conditioning MLP). The LayerNorm has no
affine parameters (the modulation plays that role) and normalises over C.

Unfused, PyTorch reads and writes the (B, S, C) tensor once per op (norm, mul, add; mul,
add), and the backward again per op. Fused, each is one read of the inputs and one write
of the output. Forward kernels tile [BLOCK_S tokens × all C channels] per program (the
LayerNorm needs whole rows); backward kernels give each program one sample and a run of
its tokens, so the per-sample gradients of shift, scale and gate (sums over tokens) are
accumulated in registers and written once per program, then summed over the few programs
that split a sample's tokens (none for short DiT sequences).

Any mix of fp16/bf16/fp32 inputs works (autocast gives an fp32 residual stream and bf16
modulation vectors); the output has the promoted dtype, and all arithmetic is fp32
(float64 under the interpreter, for ``gradcheck``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import (check_float_dtype, compute_dtype, new_output, next_pow2, resolve_backend,
                        tl, triton, triton_interpreting)

MAX_CHANNELS = 16384  # one row must fit in a program's registers


#################################################################################
#                                 Triton kernels                                #
#################################################################################

@triton.jit
def _ln_modulate_fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD, S, C, eps, sshb, sscb,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program: BLOCK_S tokens of sample b, whole rows of C channels."""
    b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < S)[:, None] & c_ok[None, :]
    offs = (b * S + rows)[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, 1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    shift = tl.load(SHIFT + b * sshb + cols, mask=c_ok, other=0.0).to(ACC)
    scale = tl.load(SCALE + b * sscb + cols, mask=c_ok, other=0.0).to(ACC)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(Y + offs, y, mask=mask)
    tl.store(MEAN + b * S + rows, mean, mask=rows < S)
    tl.store(RSTD + b * S + rows, rstd, mask=rows < S)


@triton.jit
def _ln_modulate_bwd_kernel(
    DY, X, SCALE, MEAN, RSTD, DX, DSHIFT, DSCALE,
    S, C, rows_per_split, sscb,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program: tokens [split·R, split·R + R) of sample b.

    With x̂ = (x − μ)·rstd and g = dy·(1 + scale):
    dx = rstd·(g − mean_C(g) − x̂·mean_C(g·x̂)), dshift = Σ_tokens dy, dscale = Σ_tokens dy·x̂.
    """
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    scale1 = 1.0 + tl.load(SCALE + b * sscb + cols, mask=c_ok, other=0.0).to(ACC)
    dshift = tl.zeros([BLOCK_C], ACC)
    dscale = tl.zeros([BLOCK_C], ACC)
    lo = split * rows_per_split
    hi = tl.minimum(S, lo + rows_per_split)
    for s0 in range(lo, hi, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        r_ok = rows < hi
        mask = r_ok[:, None] & c_ok[None, :]
        offs = (b * S + rows)[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(MEAN + b * S + rows, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + b * S + rows, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dshift += tl.sum(dy, 0)
        dscale += tl.sum(dy * xhat, 0)
        g = dy * scale1[None, :]
        mean_g = tl.sum(g, 1) / C
        mean_gx = tl.sum(g * xhat, 1) / C
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx, mask=mask)
    part = (split * tl.num_programs(0) + b) * C + cols
    tl.store(DSHIFT + part, dshift, mask=c_ok)
    tl.store(DSCALE + part, dscale, mask=c_ok)


@triton.jit
def _gated_residual_fwd_kernel(
    X, GATE, Yin, OUT, S, C, sgb,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program: out = x + gate·y for BLOCK_S tokens of sample b."""
    b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < S)[:, None] & c_ok[None, :]
    offs = (b * S + rows)[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(Yin + offs, mask=mask, other=0.0).to(ACC)
    gate = tl.load(GATE + b * sgb + cols, mask=c_ok, other=0.0).to(ACC)
    tl.store(OUT + offs, x + gate[None, :] * y, mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, GATE, Yin, DY, DGATE, S, C, rows_per_split, sgb,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program: dy = gate·dout and the partial Σ_tokens dout·y for a run of sample b's tokens."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    gate = tl.load(GATE + b * sgb + cols, mask=c_ok, other=0.0).to(ACC)
    dgate = tl.zeros([BLOCK_C], ACC)
    lo = split * rows_per_split
    hi = tl.minimum(S, lo + rows_per_split)
    for s0 in range(lo, hi, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < hi)[:, None] & c_ok[None, :]
        offs = (b * S + rows)[:, None] * C + cols[None, :]
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(Yin + offs, mask=mask, other=0.0).to(ACC)
        dgate += tl.sum(dout * y, 0)
        tl.store(DY + offs, dout * gate[None, :], mask=mask)
    tl.store(DGATE + (split * tl.num_programs(0) + b) * C + cols, dgate, mask=c_ok)


#################################################################################
#                        Tiling heuristic and launchers                         #
#################################################################################

def row_block(S: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps): whole rows, about 4k elements per tile."""
    block_c = max(16, next_pow2(C))
    block_s = max(1, min(next_pow2(S), 4096 // block_c))
    return block_s, block_c, 4 if block_c * block_s <= 2048 else 8


def token_splits(B: int, S: int, block_s: int, target_programs: int = 528) -> int:
    """How many programs share one sample's tokens in a backward (1 when B alone fills the GPU).

    The default target is four programs per SM of an H100 (132 SMs).
    """
    blocks = triton.cdiv(S, block_s)
    return max(1, min(blocks, triton.cdiv(target_programs, B)))


def _acc(*tensors):
    return compute_dtype(torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32)


def _stat_dtype(acc) -> torch.dtype:
    return torch.float64 if acc == tl.float64 else torch.float32


def _partial_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum the per-split partial gradients (a view, no kernel, when there is one split)."""
    return (part[0] if part.shape[0] == 1 else part.sum(0)).to(dtype)


def _vec(t: torch.Tensor) -> torch.Tensor:
    """(B, C) with unit channel stride; the batch stride may be anything (adaLN chunks)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _splits(B: int, S: int, block_s: int, splits: int | None) -> tuple[int, int]:
    """(number of splits, tokens per split), tokens per split a multiple of block_s."""
    n = splits or token_splits(B, S, block_s)
    rows = triton.cdiv(triton.cdiv(S, n), block_s) * block_s
    return triton.cdiv(S, rows), rows


class LayerNormModulate(torch.autograd.Function):
    """Autograd wrapper: saves x, scale and the per-token mean and 1/std."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps: float, block_s: int | None, splits: int | None):
        x, shift, scale = x.contiguous(), _vec(shift), _vec(scale)
        B, S, C = x.shape
        bs, bc, warps = row_block(S, C)
        bs = block_s or bs
        acc = _acc(x, shift, scale)
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype))
        y = new_output((B, S, C), out_dtype, x.device)
        mean = new_output((B, S), _stat_dtype(acc), x.device)
        rstd = new_output((B, S), _stat_dtype(acc), x.device)
        # samples on grid axis 0: CUDA allows 2³¹−1 programs there but only 65535 on axis 1.
        _ln_modulate_fwd_kernel[(B, triton.cdiv(S, bs))](
            x, shift, scale, y, mean, rstd, S, C, eps, shift.stride(0), scale.stride(0),
            BLOCK_S=bs, BLOCK_C=bc, ACC=acc, num_warps=warps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype, ctx.block_s, ctx.splits = shift.dtype, bs, splits
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        B, S, C = x.shape
        _, bc, warps = row_block(S, C)
        n_split, rows_per_split = _splits(B, S, ctx.block_s, ctx.splits)
        dx = new_output((B, S, C), x.dtype, x.device)
        dshift = new_output((n_split, B, C), mean.dtype, x.device)
        dscale = new_output((n_split, B, C), mean.dtype, x.device)
        _ln_modulate_bwd_kernel[(B, n_split)](
            dy, x, scale, mean, rstd, dx, dshift, dscale, S, C, rows_per_split, scale.stride(0),
            BLOCK_S=ctx.block_s, BLOCK_C=bc, ACC=_acc(x, dy, scale), num_warps=warps)
        return (dx, _partial_sum(dshift, ctx.shift_dtype), _partial_sum(dscale, scale.dtype),
                None, None, None)


class GatedResidual(torch.autograd.Function):
    """Autograd wrapper: saves gate and y; the gradient of x is dout itself."""

    @staticmethod
    def forward(ctx, x, gate, y, block_s: int | None, splits: int | None):
        x, gate, y = x.contiguous(), _vec(gate), y.contiguous()
        B, S, C = x.shape
        bs, bc, warps = row_block(S, C)
        bs = block_s or bs
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
        out = new_output((B, S, C), out_dtype, x.device)
        _gated_residual_fwd_kernel[(B, triton.cdiv(S, bs))](
            x, gate, y, out, S, C, gate.stride(0),
            BLOCK_S=bs, BLOCK_C=bc, ACC=_acc(x, gate, y), num_warps=warps)
        ctx.save_for_backward(gate, y)
        ctx.x_dtype, ctx.block_s, ctx.splits = x.dtype, bs, splits
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dout = dout.contiguous()
        B, S, C = y.shape
        _, bc, warps = row_block(S, C)
        n_split, rows_per_split = _splits(B, S, ctx.block_s, ctx.splits)
        acc = _acc(dout, gate, y)
        dy = new_output((B, S, C), y.dtype, y.device)
        dgate = new_output((n_split, B, C), _stat_dtype(acc), y.device)
        _gated_residual_bwd_kernel[(B, n_split)](
            dout, gate, y, dy, dgate, S, C, rows_per_split, gate.stride(0),
            BLOCK_S=ctx.block_s, BLOCK_C=bc, ACC=acc, num_warps=warps)
        return dout.to(ctx.x_dtype), _partial_sum(dgate, gate.dtype), dy, None, None


#################################################################################
#                       Reference, Triton entry, dispatcher                     #
#################################################################################

def layernorm_modulate_reference(x, shift, scale, eps: float = 1e-6):
    """``LayerNorm(x) · (1 + scale) + shift`` with unfused PyTorch ops (the ``torch`` backend)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_reference(x, gate, y):
    """``x + gate · y`` with PyTorch ops (the ``torch`` backend)."""
    return x + gate.unsqueeze(1) * y


def layernorm_modulate_triton(x, shift, scale, eps: float = 1e-6, block_s: int | None = None,
                              splits: int | None = None):
    """The Triton path with no fallback; ``block_s``/``splits`` override the tiling (tests)."""
    return LayerNormModulate.apply(x, shift, scale, float(eps), block_s, splits)


def gated_residual_triton(x, gate, y, block_s: int | None = None, splits: int | None = None):
    """The Triton path with no fallback; ``block_s``/``splits`` override the tiling (tests)."""
    return GatedResidual.apply(x, gate, y, block_s, splits)


def _unsupported(x, vecs, others=()) -> str | None:
    if x.dim() != 3:
        return f"x must be (B, S, C), got shape {tuple(x.shape)}"
    for o in others:
        if o.shape != x.shape:
            return f"y shape {tuple(o.shape)} != x shape {tuple(x.shape)}"
    B, _, C = x.shape
    for v in vecs:
        if v.dim() != 2 or tuple(v.shape) != (B, C):
            return f"per-sample vectors must be (B, C) = {(B, C)}, got {tuple(v.shape)}"
    if C > MAX_CHANNELS:
        return f"{C} channels > {MAX_CHANNELS}"
    if x.numel() == 0:
        return "empty input"
    interp = triton_interpreting(_ln_modulate_fwd_kernel)
    for t in (x, *vecs, *others):
        reason = check_float_dtype(t, interp)
        if reason:
            return reason
    return None


def layernorm_modulate(x, shift, scale, eps: float = 1e-6, backend: str = "auto"):
    """adaLN: ``LayerNorm(x) · (1 + scale) + shift``, x (B, S, C), shift/scale (B, C).

    The LayerNorm has no affine parameters and ``eps`` defaults to DiT's 1e-6.
    ``backend="auto"`` runs the fused Triton kernel on CUDA and the reference elsewhere.
    """
    reason = _unsupported(x, (shift, scale))
    which = resolve_backend(backend, "layernorm_modulate", _ln_modulate_fwd_kernel, (x, shift, scale), reason)
    if which == "torch":
        return layernorm_modulate_reference(x, shift, scale, eps)
    return layernorm_modulate_triton(x, shift, scale, eps)


def gated_residual(x, gate, y, backend: str = "auto"):
    """adaLN-Zero residual: ``x + gate · y``, x and y (B, S, C), gate (B, C)."""
    reason = _unsupported(x, (gate,), (y,))
    which = resolve_backend(backend, "gated_residual", _gated_residual_fwd_kernel, (x, gate, y), reason)
    if which == "torch":
        return gated_residual_reference(x, gate, y)
    return gated_residual_triton(x, gate, y)
