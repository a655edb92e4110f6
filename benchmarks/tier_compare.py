"""One prompt tier against the canonical one on the same evaluation seed, from ``metrics.json`` files.

``clopdit evaluate`` scores canonical prompts and the baselines over every evaluation seed and the
other tiers on seed 0 only, so a tier's macro (seed 0) beside canonical's (mean over seeds) mixes
a tier effect with seed noise; on the held-out cells of training studies, with few conditions,
the noise is large. This reads each generator's seed-0 rows (``per_condition``) and gives, per
held-out set and part (every condition / those training has), the macro of each metric for the
canonical tier, the tier, the real half, copies of training cells and the Gaussian, all on seed
0, and the ratios the floors use (identity over the real half's; energy, MMD, W2 over the copies'
on the studies and the Gaussian's on the cells).

    python benchmarks/tier_compare.py benchmarks/results/s25_assay/seed0 ... --tier assay \\
        --out benchmarks/results/s25_assay/tier_compare.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

JUDGES = ("identity_cell_type", "identity_tissue_general", "identity_disease")
DISTANCES = ("energy", "energy_u", "mmd", "w2")
BASE = {"studies": "training_copies", "cells": "gaussian"}


def seed0_macro(rows: list[dict], keep) -> dict[str, float]:
    rows = [r for r in rows if keep(r)]
    return {k: float(np.nanmean([r[k] for r in rows])) for k in (*JUDGES, *DISTANCES, "coverage")} if rows else {}


def compare(metrics: dict, tier: str) -> dict:
    out = {}
    for set_name, block in metrics["sets"].items():
        gens = block.get("generators", {})
        if f"model_{tier}" not in gens:
            continue
        for part, keep in (("macro", lambda r: True), ("macro_seen", lambda r: not r["novel"])):
            m = {g: seed0_macro(gens[g]["per_condition"], keep)
                 for g in ("real_half", "training_copies", "gaussian", "model_canonical", f"model_{tier}") if g in gens}
            if not m["real_half"] or not m.get(BASE[set_name]):
                continue
            row = {"conditions": sum(1 for r in gens["real_half"]["per_condition"] if keep(r)), "seed0": m}
            for g in ("model_canonical", f"model_{tier}", "training_copies", "gaussian"):
                if not m.get(g):
                    continue
                row[g] = {**{f"{j}_over_ceiling": m[g][j] / m["real_half"][j] for j in JUDGES if m["real_half"][j]},
                          **{f"{d}_over_{BASE[set_name]}": m[g][d] / m[BASE[set_name]][d] for d in ("energy", "mmd", "w2")}}
            out[f"{set_name}/{part}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="directories holding an evaluation's metrics.json")
    p.add_argument("--tier", default="assay")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = {"tier": args.tier, "per_dir": {}}
    for d in args.dirs:
        with open(os.path.join(d, "metrics.json")) as f:
            result["per_dir"][d] = compare(json.load(f), args.tier)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    for d, sets in result["per_dir"].items():
        for key, row in sets.items():
            for g in ("model_canonical", f"model_{args.tier}", "training_copies", "gaussian"):
                if g in row:
                    vals = "  ".join(f"{k.replace('identity_', '').replace('_over_ceiling', '')} {v:.3f}"
                                     for k, v in row[g].items())
                    print(f"{d}  {key:18s} n={row['conditions']:<3d} {g:22s} {vals}")


if __name__ == "__main__":
    main()
