"""Triton kernels against their PyTorch references, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter (numpy on CPU tensors), which must be
switched on before triton is first imported: hence the lines above the imports.

Every run draws fresh inputs (the seed is in each failure message); kernel outputs are
allocated full of NaN (``POISON_OUTPUTS``), so an element a kernel fails to write fails the
comparison. References run in float64 on the same (rounded) inputs.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from clopdit_dist import kernels  # noqa: E402
from clopdit_dist.kernels import _dispatch  # noqa: E402
from clopdit_dist.kernels.attention import (AttnBlocks, _attn_fwd_kernel, _flash_fwd, attention,  # noqa: E402
                               attention_reference, attention_triton)
from clopdit_dist.kernels.modulate import (gated_residual, gated_residual_reference, gated_residual_triton,  # noqa: E402
                              layernorm_modulate, layernorm_modulate_reference, layernorm_modulate_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = _dispatch.triton_interpreting(_attn_fwd_kernel)
needs_triton = pytest.mark.skipif(not (DEVICE == "cuda" or INTERPRETING),
                                  reason="no GPU and TRITON_INTERPRET=1 was not set before triton was imported")
needs_fp64 = pytest.mark.skipif(not INTERPRETING, reason="float64 kernels run only in the interpreter")

# Max |kernel − float64 reference| / max(|reference|, 1), per input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# The attention kernels take fp32 in the interpreter only (on GPU: fp16/bf16, fp32 goes to SDPA).
ATTN_DTYPE = torch.float32 if INTERPRETING else torch.bfloat16


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_dispatch, "POISON_OUTPUTS", True)


@pytest.fixture
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype).requires_grad_()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def check_close(pairs, tol, seed):
    for name, got, ref in pairs:
        assert torch.isfinite(got).all(), f"{name}: kernel left NaN/inf (unwritten elements?), seed={seed}"
        err = rel_err(got, ref)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}, seed={seed}"


def fwd_bwd(fn, inputs):
    """Run fn, backprop fresh random cotangents; return output, grads and the cotangent."""
    out = fn(*inputs)
    dout = torch.randn_like(out)
    out.backward(dout)
    return out, [x.grad for x in inputs], dout


def reference_fwd_bwd(fn, inputs, dout):
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dout.double())
    return out, [x.grad for x in leaves]


#################################################################################
#                                   Attention                                   #
#################################################################################

@needs_triton
@pytest.mark.parametrize("B,H,S,D,causal,blocks", [
    (1, 1, 1, 16, False, None),                  # a single token
    (2, 3, 17, 40, True, None),                  # odd length, head dim not a power of 2
    (1, 2, 100, 64, False, None),                # whole sequence in one program
    (1, 2, 100, 64, True, AttnBlocks(32, 16, 4)),  # several blocks: online softmax, dQ kernel
    (2, 1, 33, 16, False, AttnBlocks(16, 32, 4)),  # queries blocks smaller than key blocks
])
def test_attention_matches_reference(B, H, S, D, causal, blocks, seed):
    q, k, v = (rand(B, H, S, D, dtype=ATTN_DTYPE) for _ in range(3))
    out, grads, dout = fwd_bwd(lambda a, b, c: attention_triton(a, b, c, causal, blocks=blocks), [q, k, v])
    ref, ref_grads = reference_fwd_bwd(lambda a, b, c: attention_reference(a, b, c, causal), [q, k, v], dout)
    check_close([("out", out, ref)] + [(f"d{n}", g, r) for n, g, r in zip("qkv", grads, ref_grads)],
                TOL[ATTN_DTYPE], seed)


@needs_triton
def test_attention_saves_logsumexp(seed):
    q, k, v = (rand(2, 2, 17, 40, dtype=ATTN_DTYPE).detach() for _ in range(3))
    _, lse = _flash_fwd(q, k, v, True, 40 ** -0.5, AttnBlocks(16, 16, 4))
    _, ref = attention_reference(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    check_close([("lse", lse, ref)], TOL[ATTN_DTYPE], seed)


@needs_triton
@pytest.mark.parametrize("dtype,causal", [(torch.bfloat16, False), (torch.float16, True)])
def test_attention_half_precision(dtype, causal, seed):
    q, k, v = (rand(2, 2, 17, 40, dtype=dtype) for _ in range(3))
    out, grads, dout = fwd_bwd(lambda a, b, c: attention_triton(a, b, c, causal), [q, k, v])
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref, ref_grads = reference_fwd_bwd(lambda a, b, c: attention_reference(a, b, c, causal), [q, k, v], dout)
    check_close([("out", out, ref)] + [(f"d{n}", g, r) for n, g, r in zip("qkv", grads, ref_grads)],
                TOL[dtype], seed)


@needs_triton
def test_attention_strided_qkv_views(seed):
    """q, k, v as the DiT makes them: permuted views of one qkv projection."""
    B, S, H, D = 2, 17, 2, 16
    qkv = rand(B, S, 3, H, D, dtype=ATTN_DTYPE)
    out, (g,), dout = fwd_bwd(lambda t: attention_triton(*t.permute(2, 0, 3, 1, 4).unbind(0)), [qkv])
    ref, (rg,) = reference_fwd_bwd(lambda t: attention_reference(*t.permute(2, 0, 3, 1, 4).unbind(0)), [qkv], dout)
    check_close([("out", out, ref), ("dqkv", g, rg)], TOL[ATTN_DTYPE], seed)


@needs_fp64
@pytest.mark.parametrize("S,D,causal,blocks,fast", [
    (3, 4, False, None, False),                  # the full Jacobian, on a tiny case
    (5, 8, False, None, True),
    (19, 8, True, AttnBlocks(16, 16, 4), True),  # two blocks with a masked tail
])
def test_attention_gradcheck(S, D, causal, blocks, fast):
    q, k, v = (torch.randn(1, 2, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: attention_triton(a, b, c, causal, blocks=blocks),
                                    (q, k, v), fast_mode=fast)


#################################################################################
#                        LayerNorm + adaLN modulation                           #
#################################################################################

def _both_ops(block_s=None, splits=None):
    def run(x, shift, scale, gate, y):
        h = layernorm_modulate_triton(x, shift, scale, block_s=block_s, splits=splits)
        return gated_residual_triton(h, gate, y, block_s=block_s, splits=splits)
    return run


def _both_refs(x, shift, scale, gate, y):
    return gated_residual_reference(layernorm_modulate_reference(x, shift, scale), gate, y)


@needs_triton
@pytest.mark.parametrize("B,S,C,block_s,splits", [
    (2, 17, 40, None, None),   # odd tokens, channels not a power of 2
    (2, 1, 16, None, None),    # a single token
    (3, 100, 64, 8, 3),        # each sample's tokens split over 3 programs in the backward
    (1, 5, 384, 2, None),      # DiT-S width, several token blocks
])
def test_modulate_fp32_matches_reference(B, S, C, block_s, splits, seed):
    inputs = [rand(B, S, C), rand(B, C), rand(B, C), rand(B, C), rand(B, S, C)]
    out, grads, dout = fwd_bwd(_both_ops(block_s, splits), inputs)
    ref, ref_grads = reference_fwd_bwd(_both_refs, inputs, dout)
    names = ["dx", "dshift", "dscale", "dgate", "dy"]
    check_close([("out", out, ref)] + list(zip(names, grads, ref_grads)), TOL[torch.float32], seed)


@needs_triton
@pytest.mark.parametrize("x_dtype,vec_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.bfloat16)])  # autocast: fp32 stream
def test_modulate_half_and_mixed_precision(x_dtype, vec_dtype, seed):
    B, S, C = 2, 17, 40
    inputs = [rand(B, S, C, dtype=x_dtype), rand(B, C, dtype=vec_dtype), rand(B, C, dtype=vec_dtype),
              rand(B, C, dtype=vec_dtype), rand(B, S, C, dtype=vec_dtype)]
    out, grads, dout = fwd_bwd(_both_ops(), inputs)
    assert out.dtype == torch.promote_types(x_dtype, vec_dtype)
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    ref, ref_grads = reference_fwd_bwd(_both_refs, inputs, dout)
    names = ["dx", "dshift", "dscale", "dgate", "dy"]
    check_close([("out", out, ref)] + list(zip(names, grads, ref_grads)), TOL[vec_dtype], seed)


@needs_fp64
@pytest.mark.parametrize("B,S,C,block_s,splits,fast", [
    (1, 2, 3, None, None, False),  # the full Jacobian, on a tiny case
    (2, 5, 6, None, None, True),
    (2, 5, 6, 2, 2, True),         # token blocks and splits
])
def test_modulate_gradcheck(B, S, C, block_s, splits, fast):
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in [(B, S, C), (B, C), (B, C), (B, C), (B, S, C)]]
    assert torch.autograd.gradcheck(_both_ops(block_s, splits), inputs, fast_mode=fast)


#################################################################################
#                                  Dispatcher                                   #
#################################################################################

def test_auto_on_cpu_takes_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("auto must not run Triton on CPU tensors")
    # ``kernels.attention`` is the function; the module is reached through importlib.
    attention_module = importlib.import_module("clopdit_dist.kernels.attention")
    monkeypatch.setattr(attention_module, "attention_triton", boom)
    monkeypatch.setattr("clopdit_dist.kernels.modulate.layernorm_modulate_triton", boom)
    monkeypatch.setattr("clopdit_dist.kernels.modulate.gated_residual_triton", boom)
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    x, s1, s2 = torch.randn(2, 7, 32), torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(kernels.attention(q, k, v), attention_reference(q, k, v))
    torch.testing.assert_close(layernorm_modulate(x, s1, s2), layernorm_modulate_reference(x, s1, s2))
    torch.testing.assert_close(gated_residual(x, s1, x), gated_residual_reference(x, s1, x))


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda kernel: False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention(q, q, q, backend="triton")
    x, s = torch.randn(1, 4, 16), torch.randn(1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layernorm_modulate(x, s, s, backend="triton")


@needs_triton
def test_bad_backend_and_unsupported_inputs():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="backend='cuda'"):
        attention(q, q, q, backend="cuda")
    big = torch.randn(1, 1, 4, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 256"):
        attention(big, big, big, backend="triton")
    torch.testing.assert_close(attention(big, big, big, backend="auto"), attention_reference(big, big, big))
    x, s = torch.randn(2, 4, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        layernorm_modulate(x, s, s, backend="triton")


#################################################################################
#                  GPU code, compiled here: registers and spills                #
#################################################################################

@pytest.mark.slow
def test_kernels_compile_for_h100_without_spills():
    """ptxas (shipped in the Triton wheel) builds every kernel for sm_90 without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["kernel"] for r in rows} >= {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                                            "_attn_bwd_dq_kernel", "_ln_modulate_fwd_kernel",
                                            "_ln_modulate_bwd_kernel", "_gated_residual_fwd_kernel",
                                            "_gated_residual_bwd_kernel"}
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, f"register spills: {r}"
        assert r["shared"] <= r["shared_limit"], f"too much shared memory: {r}"


def test_poisoned_allocation_is_nan():
    assert torch.isnan(_dispatch.new_output((3, 4), torch.float32, "cpu")).all()
