"""Benchmarks for the DiT kernels: attention, fused adaLN modulation, a whole DiT-B training step.

On a GPU (H100/H200 for the floors below):

    python benchmarks/kernel_speed.py --out bench_kernels.jsonl

On a machine without one the same cases run on small shapes with the PyTorch reference
path (``--quick`` is implied), and every line says that no GPU was found:

    python benchmarks/kernel_speed.py --quick

Each result is one JSON line on stdout (and appended to ``--out``), with fields such as
bench, case, backend, device, dtype, B, H, S, D, ms, tflops, gbps, speedup_vs_best_sdpa.

* attention: our Triton kernel against ``F.scaled_dot_product_attention`` pinned to each
  backend (flash, efficient, cuDNN, math via ``torch.nn.attention.sdpa_kernel``), forward
  and forward+backward, at DiT shapes (batch 256-4096, 16/64/256 tokens, head dim 32/64,
  bf16, heads = 768 / head dim). FLOPs: 4·B·H·S²·D forward, 2.5× that backward.
  ``max_err`` is the Triton output's largest deviation from the fp32 math backend.
* modulate: fused ``layernorm_modulate`` and ``gated_residual`` against the unfused PyTorch
  ops, in GB/s of the minimal traffic (each (B, S, C) tensor read or written once per
  pass), and as a fraction of the card's copy bandwidth, measured by a plain tensor copy.
* dit_step: a DiT-B flow-matching training step (bf16 autocast, AdamW) with the Triton
  backend against the torch backend; TFLOP/s from ``DiT.train_flops_per_sample``.

Floors on an H100/H200: attention fwd+bwd at DiT shapes at least as fast as the best SDPA
backend; fused modulate ≥ 2× unfused and ≥ 70 % of copy bandwidth; the DiT-B step ≥ 1.2×
faster with Triton.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clopdit_dist.models.dit import build_dit  # noqa: E402
from clopdit_dist.kernels.attention import attention  # noqa: E402
from clopdit_dist.kernels.modulate import gated_residual, layernorm_modulate  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
DEVICE_NAME = torch.cuda.get_device_name() if HAS_GPU else "cpu"
NO_GPU_NOTE = "no GPU found: reference (torch) path on CPU, small shapes; Triton rows need a GPU"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def emit(record: dict, out_file) -> None:
    record = {"device": DEVICE_NAME, "gpu": HAS_GPU, **record}
    if not HAS_GPU:
        record["note"] = NO_GPU_NOTE
    line = json.dumps(record)
    print(line, flush=True)
    if out_file:
        out_file.write(line + "\n")
        out_file.flush()


def time_ms(fn, warmup: int, rep: int) -> float:
    """Mean milliseconds per call after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if HAS_GPU:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rep):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / rep
    t0 = time.perf_counter()
    for _ in range(rep):
        fn()
    return (time.perf_counter() - t0) * 1e3 / rep


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


#################################################################################
#                                   Attention                                   #
#################################################################################

def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {f"sdpa-{k}": getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def attention_runners():
    """name → fn(q, k, v); the Triton kernel only where there is a GPU."""
    from torch.nn.attention import sdpa_kernel

    def pinned(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    runners = {"triton": lambda q, k, v: attention(q, k, v, backend="triton")} if HAS_GPU else {
        "torch": lambda q, k, v: attention(q, k, v, backend="torch")}
    runners.update({name: pinned(b) for name, b in sdpa_backends().items()})
    return runners


def attention_case(args, B: int, S: int, D: int, dtype, out_file) -> list:
    """Time every runner at one shape; rows for the timed ones (unavailable ones are emitted)."""
    H = 768 // D
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    fwd_flops = 4.0 * B * H * S * S * D
    ref = None
    if HAS_GPU:
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rows = []
    for name, fn in attention_runners().items():
        row = dict(bench="attention", case=f"B{B}-S{S}-D{D}", dtype=str(dtype).replace("torch.", ""),
                   B=B, H=H, S=S, D=D, backend=name)

        def fwd_bwd(fn=fn):
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(do)
        try:
            with torch.no_grad():
                out = fn(q, k, v)
                if ref is not None:
                    row["max_err"] = (out.float() - ref).abs().max().item()
                ms_fwd = time_ms(lambda: fn(q, k, v), args.warmup, args.rep)
            ms_fb = time_ms(fwd_bwd, args.warmup, args.rep)
        except (RuntimeError, ValueError) as err:  # backend not available for this case (or out of memory)
            emit({**row, "status": "unavailable", "error": first_line(err)}, out_file)
            continue
        for mode, ms, flops in (("fwd", ms_fwd, fwd_flops), ("fwd+bwd", ms_fb, 3.5 * fwd_flops)):
            rows.append({**row, "mode": mode, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 3)})
    return rows


def bench_attention(args, out_file):
    dtype = DTYPES[args.dtype] if HAS_GPU else torch.float32
    if args.quick:
        cases = [(8, 16, 32), (8, 64, 64), (4, 256, 64)]
    else:
        cases = [(B, S, D) for D in (32, 64) for B, S in ((256, 16), (4096, 16), (1024, 64), (256, 256), (1024, 256))]
    for B, S, D in cases:
        rows = attention_case(args, B, S, D, dtype, out_file)
        for mode in ("fwd", "fwd+bwd"):
            sdpa = [r["ms"] for r in rows if r["mode"] == mode and r["backend"].startswith("sdpa-")]
            best = min(sdpa) if sdpa else None
            for r in rows:
                if r["mode"] == mode:
                    r["best_sdpa_ms"] = best
                    r["speedup_vs_best_sdpa"] = round(best / r["ms"], 3) if best else None
                    emit(r, out_file)


#################################################################################
#                       Fused LayerNorm + modulation                            #
#################################################################################

def copy_bandwidth_gbps(numel: int, dtype, args) -> float:
    src = torch.randn(numel, device=DEVICE, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), max(3, args.warmup), max(20, args.rep))  # short: more repeats
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_modulate(args, out_file):
    dtype = DTYPES[args.dtype] if HAS_GPU else torch.float32
    cases = [(32, 16, 384), (8, 64, 768)] if args.quick else [(4096, 16, 768), (1024, 64, 768), (256, 256, 768),
                                                               (256, 256, 1024)]
    variants = {"triton-fused": "triton", "torch-unfused": "torch"} if HAS_GPU else {"torch-unfused": "torch"}
    for B, S, C in cases:
        x = torch.randn(B, S, C, device=DEVICE, dtype=dtype, requires_grad=True)
        y = torch.randn_like(x, requires_grad=True)
        shift, scale, gate = (torch.randn(B, C, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(x)
        elem = x.element_size() * B * S * C
        copy_gbps = copy_bandwidth_gbps(B * S * C, dtype, args)
        base = dict(bench="modulate", case=f"B{B}-S{S}-C{C}", dtype=str(dtype).replace("torch.", ""), B=B, S=S, C=C)
        emit({**base, "op": "copy", "backend": "torch", "mode": "fwd", "gbps": round(copy_gbps, 1)}, out_file)
        ops = {
            # name: (fn(backend), bytes forward, bytes backward)
            "layernorm_modulate": (lambda be: layernorm_modulate(x, shift, scale, backend=be), 2 * elem, 3 * elem),
            "gated_residual": (lambda be: gated_residual(x, gate, y, backend=be), 3 * elem, 3 * elem),
        }
        for op, (fn, fwd_bytes, bwd_bytes) in ops.items():
            results = {}
            for label, be in variants.items():
                def fwd_bwd():
                    x.grad = y.grad = shift.grad = scale.grad = gate.grad = None
                    fn(be).backward(dout)
                with torch.no_grad():
                    ms_f = time_ms(lambda: fn(be), args.warmup, args.rep)
                ms_fb = time_ms(fwd_bwd, args.warmup, args.rep)
                results[label] = {"fwd": (ms_f, fwd_bytes), "fwd+bwd": (ms_fb, fwd_bytes + bwd_bytes)}
            for label, modes in results.items():
                for mode, (ms, nbytes) in modes.items():
                    gbps = nbytes / ms / 1e6
                    ref_ms = results["torch-unfused"][mode][0]
                    emit({**base, "op": op, "backend": label, "mode": mode, "ms": round(ms, 4),
                          "gbps": round(gbps, 1), "fraction_of_copy_bw": round(gbps / copy_gbps, 3),
                          "speedup_vs_unfused": round(ref_ms / ms, 3)}, out_file)


#################################################################################
#                              DiT-B training step                              #
#################################################################################

def dit_step_ms(args, name: str, B: int, backend: str) -> tuple[float, float]:
    """(ms per flow-matching training step, train FLOPs per step) of one model and backend."""
    torch.manual_seed(0)
    model = build_dit(name, backend=backend).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if HAS_GPU else {}))
    x1 = torch.randn(B, model.tokens, model.token_dim, device=DEVICE)
    cond = torch.randn(B, model.num_fields, model.cond_dim, device=DEVICE)
    drop = torch.rand(B, model.num_fields, device=DEVICE) < 0.1

    def step():
        x0 = torch.randn_like(x1)
        t = torch.rand(B, device=DEVICE)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=HAS_GPU):
            loss = (model(xt, t, cond, drop).float() - (x1 - x0)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time_ms(step, args.warmup, max(3, args.rep // 4)), model.train_flops_per_sample() * B


def bench_dit_step(args, out_file):
    name, batches = ("DiT-XS", (32,)) if args.quick else ("DiT-B", (256, 2048))
    backends = ("torch", "triton") if HAS_GPU else ("torch",)
    for B in batches:
        ms_by_backend = {}
        for backend in backends:
            ms, flops = dit_step_ms(args, name, B, backend)
            ms_by_backend[backend] = ms
            emit(dict(bench="dit_step", case=f"{name}-B{B}", model=name, backend=backend, B=B, tokens=16,
                      dtype="bf16-autocast" if HAS_GPU else "fp32", ms=round(ms, 3),
                      samples_per_s=round(B / ms * 1e3, 1), tflops=round(flops / ms / 1e9, 3),
                      speedup_vs_torch=round(ms_by_backend["torch"] / ms, 3)), out_file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="append the JSON lines to this file too")
    p.add_argument("--quick", action="store_true", help="small shapes (implied without a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="GPU dtype (CPU runs fp32)")
    p.add_argument("--only", choices=["attention", "modulate", "dit_step"], action="append",
                   help="run only these benchmarks (repeatable)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rep", type=int, default=None)
    args = p.parse_args(argv)
    if not HAS_GPU:
        print(f"benchmarks/kernel_speed.py: {NO_GPU_NOTE}", file=sys.stderr)
        args.quick = True
    args.warmup = args.warmup if args.warmup is not None else (10 if HAS_GPU else 1)
    args.rep = args.rep if args.rep is not None else (50 if HAS_GPU else 3)
    benches = {"attention": bench_attention, "modulate": bench_modulate, "dit_step": bench_dit_step}
    out_file = open(args.out, "a") if args.out else None
    try:
        for name in args.only or list(benches):
            benches[name](args, out_file)
    finally:
        if out_file:
            out_file.close()


if __name__ == "__main__":
    main()
