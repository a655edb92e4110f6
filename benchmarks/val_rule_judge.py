"""Apply the adoption rule (written in session 15, before any trial) to ``val_rule.py`` lines:
a candidate default is adopted only if, as means over atlas seeds,
(a) on the val studies at each run's chosen guidance its energy is at most 2% above the base's and
its cell-type identity at most 0.01 below; (b) on val cells (held-out cells of training studies),
at the guidance each chose, its energy is lower; (c) its val disease identity is at most 0.02 below.

    python benchmarks/val_rule_judge.py benchmarks/results/val_rule.jsonl --base 'pr_s(\\d)/run' \\
        --candidate 'sde_eta1=pr_s(\\d)/run:sde_eta1' --candidate 'p_null=pnull_s(\\d)/run' \\
        --out benchmarks/results/val_rule_judged.json

``--energy energy_u`` reads the unbiased (U-statistic) energy in (a) and (b) instead of the V form: the
rule from session 22 on (``val_rule_plan.md``, "Session 22"; the V form favours generators with less
spread in the small val-cells halves).

A spec is ``[NAME=]RUN_REGEX[:VARIANT]``: the regex's first group is the atlas seed; the variant
defaults to ``run_sampler`` (the run's own sampler). Full-grid lines only (screens are skipped);
where a (run, variant) was scored twice, the last line counts (files are read in the order given).
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np


def parse(spec: str) -> tuple[str, re.Pattern, str]:
    name, _, rest = spec.rpartition("=") if "=" in spec.split(":")[0] else ("", "", spec)
    pattern, _, variant = rest.partition(":")
    return name or spec, re.compile(pattern), variant or "run_sampler"


def collect(rows: list[dict], pattern: re.Pattern, variant: str, energy: str = "energy") -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in rows:
        m = pattern.search(r["run"])
        if m and r["variant"] == variant and not r.get("screen"):
            seed = int(m.group(1))
            entry = out.setdefault(seed, {})
            if r["set"] == "val_studies":
                entry.update(guidance=r["chosen_guidance"], energy=r[energy],
                             identity_cell_type=r["identity_cell_type"], identity_disease=r["identity_disease"])
            elif r["set"] == "val_cells":
                entry.update(cells_energy=r["model_canonical"][energy],
                             cells_gaussian=r["gaussian"][energy])
            elif r["new"].get("model_canonical"):  # val_studies_parts: reported beside the rule, not part of it
                entry.update(new_combination_disease=r["new"]["model_canonical"]["identity_disease"])
    return {s: e for s, e in sorted(out.items()) if "energy" in e and "cells_energy" in e}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lines", nargs="+", help="val_rule.py output files, read in order")
    p.add_argument("--base", required=True)
    p.add_argument("--candidate", action="append", required=True)
    p.add_argument("--energy", choices=("energy", "energy_u"), default="energy",
                   help="the energy (a) and (b) read: the V form (session 15's rule) or the U form (session 22's)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [json.loads(line) for path in args.lines for line in open(path)]
    base = collect(rows, *parse(args.base)[1:], args.energy)
    result = {"rule": f"means over atlas seeds: (a) val {args.energy} <= 1.02 x base and cell-type identity >= base - "
                      f"0.01; (b) val-cells {args.energy} < base; (c) val disease identity >= base - 0.02",
              "base": {"spec": args.base, "per_seed": base}, "candidates": {}}
    for spec in args.candidate:
        name, pattern, variant = parse(spec)
        cand = collect(rows, pattern, variant, args.energy)
        seeds = sorted(set(cand) & set(base))
        mean = {k: {w: float(np.mean([src[s][k] for s in seeds])) for w, src in (("base", base), ("candidate", cand))}
                for k in ("energy", "identity_cell_type", "identity_disease", "cells_energy")}
        checks = {"a_energy": mean["energy"]["candidate"] <= 1.02 * mean["energy"]["base"],
                  "a_identity": mean["identity_cell_type"]["candidate"] >= mean["identity_cell_type"]["base"] - 0.01,
                  "b_cells_energy": mean["cells_energy"]["candidate"] < mean["cells_energy"]["base"],
                  "c_disease": mean["identity_disease"]["candidate"] >= mean["identity_disease"]["base"] - 0.02}
        result["candidates"][name] = {"spec": spec, "seeds": seeds, "per_seed": cand, "means": mean,
                                      "checks": checks, "adopt": len(seeds) >= 3 and all(checks.values())}
        print(f"{name:16s} seeds {seeds} " + " ".join(
            f"{k} {v['base']:.3f}->{v['candidate']:.3f}" for k, v in mean.items()) + f"  {checks}  adopt="
              f"{result['candidates'][name]['adopt']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
