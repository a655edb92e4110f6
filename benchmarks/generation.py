"""Generation speed: cells/s and function evaluations (NFE) of the DiT sampler plus the count
decoder, one JSON line per case.

    python benchmarks/generation.py                      # 10k cells, 20 Euler steps, guidance 2, CPU
    python benchmarks/generation.py --cells 100000 --device cuda --dtype bf16

Weights are random (speed does not depend on them); the shapes are those of the demo's
DiT (hidden 128, depth 4) and of the DiT-S preset, on a 16 x 16 latent and 2,000 genes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

# benchmarks/kernels.py would shadow the kernels package: put the repository first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clopdit_dist.models.autoencoder import AEConfig, CountAutoencoder  # noqa: E402
from clopdit_dist.models.dit import DiTConfig  # noqa: E402
from clopdit_dist.models.flow import SamplerConfig, sample  # noqa: E402

CASES = {
    "demo-h128-d4": dict(preset="DiT-XS", hidden_size=128, depth=4, num_heads=4),
    "DiT-XS": dict(preset="DiT-XS"),
    "DiT-S": dict(preset="DiT-S"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--method", default="euler")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    ae = CountAutoencoder(AEConfig(n_genes=2000)).to(device).eval()
    sampler = SamplerConfig(method=args.method, steps=args.steps, guidance=args.guidance)
    for name in args.cases.split(","):
        dit = DiTConfig(tokens=16, token_dim=16, cond_dim=256, **CASES[name]).build().to(device).eval()
        cond = torch.nn.functional.normalize(torch.randn(1, 1, 256, device=device), dim=-1)
        g = torch.Generator(device=device).manual_seed(0)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        sample(dit, cond.expand(8, -1, -1), (16, 16), SamplerConfig(steps=1), g)  # warm-up
        t_dit = t_dec = 0.0
        with torch.no_grad(), autocast:
            for start in range(0, args.cells, args.batch_size):
                b = min(args.batch_size, args.cells - start)
                t0 = time.perf_counter()
                x = sample(dit, cond.expand(b, -1, -1), (16, 16), sampler, g)
                t1 = time.perf_counter()
                ae.sample(x.reshape(b, -1).float(), torch.full((b,), 3000.0, device=device), generator=g)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_dit += t1 - t0
                t_dec += time.perf_counter() - t1
        nfe = args.steps * sampler.nfe_per_step()
        row = {"bench": "generation", "case": name, "device": str(device), "dtype": args.dtype,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "params_M": round(sum(p.numel() for p in dit.parameters()) / 1e6, 2), "cells": args.cells,
               "steps": args.steps, "method": args.method, "guidance": args.guidance, "nfe_per_cell": nfe,
               "sampler_s": round(t_dit, 2), "decode_s": round(t_dec, 2), "total_s": round(t_dit + t_dec, 2),
               "cells_per_s": round(args.cells / (t_dit + t_dec), 1)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
