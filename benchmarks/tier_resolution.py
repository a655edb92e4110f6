"""How the evaluation's own tier prompts resolve, to see what a resolver change moves on them without
scoring anything: every val and test condition (>= 30 cells) of each run's shards, its canonical,
reworded, free-form and type-only prompt (``evaluate/prompts.py``), resolved by the run's generator.

    python benchmarks/tier_resolution.py --runs W/d0 W/d1 W/d2 --out benchmarks/results/tier_resolution/CODE.json
    python benchmarks/tier_resolution.py --compare BEFORE.json AFTER.json --out-lines benchmarks/results/tier_resolution.jsonl

The first writes, per prompt (keyed by run, tier and condition, never by the prompt's words), the candidates
per field and whether each field resolved to the condition's own label alone; the second writes one JSON line
counting, per tier, prompts whose resolution changed and fields that went wrong -> right and right -> wrong.
Neither prints a prompt: the reworded and free-form wordings are held out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from _measure import emit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIERS = ("canonical", "reworded", "freeform", "type_only")
FIELDS = ("cell_type", "tissue_general", "disease")


def resolve_all(runs: list[str]) -> dict:
    from clopdit_dist.data.manifest import Manifest
    from clopdit_dist.evaluate.prompts import tier_prompt
    from clopdit_dist.generate import CellGenerator

    out = {}
    for root in runs:
        gen = CellGenerator.from_run(os.path.join(root, "run"))
        splits = Manifest.load(os.path.join(root, "shards")).data["conditions"]["splits"]
        conditions = sorted({tuple(c[f] for f in FIELDS) for s in ("val", "test") for c in splits[s]
                             if c["n_cells"] >= 30})
        for values in conditions:
            meta = dict(zip(FIELDS, values))
            for tier in TIERS:
                r = gen.resolver.resolve(tier_prompt(meta, tier), allow_empty=True)
                got = {f: sorted(c for c, _ in r.candidates[f]) for f in FIELDS}
                asked = ("cell_type",) if tier == "type_only" else FIELDS
                out["|".join([os.path.basename(root.rstrip("/")), tier, *values])] = {
                    "got": got, "right": {f: got[f] == [meta[f]] for f in asked}}
    return out


def compare(before: dict, after: dict) -> dict:
    counts = Counter()
    for key, b in before.items():
        a, tier = after[key], key.split("|")[1]
        counts[f"{tier}:changed"] += a["got"] != b["got"]
        for f, ok in b["right"].items():
            if ok != a["right"][f]:
                counts[f"{tier}:{f}:{'right->wrong' if ok else 'wrong->right'}"] += 1
    return {"prompts": len(before), **{k: v for k, v in sorted(counts.items()) if v}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", help="demo output folders (each with run/ and shards/)")
    p.add_argument("--out", help="where to write the resolutions (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument("--out-lines", default=None)
    args = p.parse_args()
    if args.compare:
        before, after = (json.load(open(x)) for x in args.compare)
        emit(args.out_lines, [], bench="tier_resolution", before=args.compare[0], after=args.compare[1],
             **compare(before, after))
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(resolve_all(args.runs), f, indent=0)


if __name__ == "__main__":
    main()
