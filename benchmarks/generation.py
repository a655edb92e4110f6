"""Generation speed: cells/s and function evaluations (NFE) of the DiT sampler plus the count
decoder, one JSON line per case.

    python benchmarks/generation.py                      # 10k cells, 20 Euler steps, guidance 2, CPU
    python benchmarks/generation.py --cells 100000 --device cuda --dtype bf16
    python benchmarks/generation.py --method sde --noise 1 --interval 0,0.5 --cases DiT-S   # the demo's sampler

Weights are random (speed does not depend on them); the decoder has 2,000 genes. Cases: the
demo's DiT (DiT-S: hidden 128, depth 4, on the autoencoder's 64-number latent as 4 tokens of
16), the previous demo's DiT-S on a 256-number latent as 8 tokens of 32, DiT-S on 16 tokens of
16 (session 1's path), DiT-B; run with ``--dtype bf16`` and ``--compile`` (as ``clopdit
generate``; the compile time is part of the total) to compare with the fp32 eager baseline.

With ``--run RUN`` it times the user's path instead, ``CellGenerator.generate`` of a trained run
with its own sampler (prompt resolution, plan, DiT, decoder, NB draws, AnnData), once per
``--prompt``, after one small warm-up call:

    python benchmarks/generation.py --run runs/demo/run --prompt "cell type: B cell; tissue: lung" \
        --prompt "cell type: B cell; tissue: lung; assay: 10x 5' v2"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from clopdit_dist.generate import Compiled, equal_batches
from clopdit_dist.models.autoencoder import AEConfig, CountAutoencoder
from clopdit_dist.models.dit import DiTConfig, LatentDiT
from clopdit_dist.models.flow import SamplerConfig, sample

CASES = {  # latent: the autoencoder's latent width (configs/ae.yaml: latent_tokens x token_dim)
    "DiT-S": dict(latent=64, preset="DiT-S", token_dim=16),
    "DiT-S-256": dict(latent=256, preset="DiT-S"),
    "DiT-S-16x16": dict(latent=256, preset="DiT-S", token_dim=16),
    "DiT-B": dict(latent=256, preset="DiT-B"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--method", default="euler")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--noise", type=float, default=0.0, help="eta of the sde method")
    p.add_argument("--interval", default="0,1", help="LO,HI: guidance only for t in [LO, HI]")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT (as clopdit generate --compile)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--run", default=None, help="time CellGenerator.generate of this trained run instead")
    p.add_argument("--prompt", action="append", default=[], help="with --run: a prompt to time (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.run:
        return time_run(args)
    device = torch.device(args.device)
    interval = tuple(float(v) for v in args.interval.split(","))
    sampler = SamplerConfig(method=args.method, steps=args.steps, guidance=args.guidance, noise=args.noise,
                            interval=interval)
    for name in args.cases.split(","):
        case = dict(CASES[name])
        latent = case.pop("latent")
        ae = CountAutoencoder(AEConfig(n_genes=2000, latent_tokens=latent // 16, token_dim=16)).to(device).eval()
        cfg = DiTConfig(cond_dim=256, **case)
        cfg.split_latent(latent, 16)
        module = LatentDiT(cfg.build(), latent).to(device).eval()
        shape = (cfg.tokens, cfg.token_dim)
        model = Compiled(module) if args.compile else module
        cond = torch.nn.functional.normalize(torch.randn(1, 1, 256, device=device), dim=-1)
        g = torch.Generator(device=device).manual_seed(0)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        t_dit = t_dec = t_first = 0.0
        with torch.no_grad(), autocast:
            for i, b in enumerate(equal_batches(args.cells, args.batch_size)):
                t0 = time.perf_counter()
                if i == 0:  # the first guided evaluation: compiles when --compile
                    sample(model, cond.expand(b, -1, -1), shape, SamplerConfig(steps=1), g)
                    t_first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                x = sample(model, cond.expand(b, -1, -1), shape, sampler, g)
                t1 = time.perf_counter()
                ae.sample(x.reshape(b, -1).float(), torch.full((b,), 3000.0, device=device), generator=g)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_dit += t1 - t0
                t_dec += time.perf_counter() - t1
        # a step is guided (all branches) only where its start time lies inside the interval, as in guided_velocity
        nfe = sum(sampler.nfe_per_step(guided=interval[0] <= i / args.steps <= interval[1]) for i in range(args.steps))
        total = t_first + t_dit + t_dec
        row = {"bench": "generation", "case": name, "device": str(device), "dtype": args.dtype, "compile": args.compile,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "params_M": round(sum(p.numel() for p in module.parameters()) / 1e6, 2), "latent": latent, "tokens": cfg.tokens,
               "token_dim": cfg.token_dim, "cells": args.cells,
               "steps": args.steps, "method": args.method, "noise": args.noise, "interval": list(interval),
               "guidance": args.guidance, "nfe_per_cell": nfe,
               "first_call_s": round(t_first, 2), "sampler_s": round(t_dit, 2), "decode_s": round(t_dec, 2),
               "total_s": round(total, 2), "cells_per_s": round(args.cells / total, 1)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


def time_run(args) -> None:
    """``--run``: seconds of ``CellGenerator.generate(prompt, n=cells)`` with the run's sampler."""
    from clopdit_dist.generate import CellGenerator

    gen = CellGenerator.from_run(args.run, device=args.device, precision=args.dtype, compile=args.compile)
    for prompt in args.prompt:
        gen.generate([prompt], n=64, seed=1)  # warm-up: resolver caches, first calls
        t0 = time.perf_counter()
        adata = gen.generate([prompt], n=args.cells, seed=0)
        total = time.perf_counter() - t0
        s = gen.default_sampler
        row = {"bench": "generation_run", "run": args.run, "prompt": prompt, "cells": adata.n_obs,
               "device": args.device, "dtype": args.dtype, "compile": args.compile, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "steps": s.steps, "method": s.method,
               "noise": s.noise, "interval": list(s.interval), "guidance": s.guidance,
               "total_s": round(total, 2), "cells_per_s": round(adata.n_obs / total, 1)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
