"""How well prompts' assay mentions are read: each prompt's expected Census labels against
:func:`~clopdit_dist.data.assay_names.assays_named`'s (no model needed: assays are read by
name, not by the text tower).

A prompt is right when the labels read equal the expected set (an empty set for a prompt that
names no assay). One JSON line per prompt set: prompts, right, right among those naming an
assay and among those naming none, and the wrong ones with what was read.

    python benchmarks/assay_names.py --prompts benchmarks/prompts/assay_names_s25.yaml --name s25 \\
        --out benchmarks/results/assay_names.jsonl
"""

from __future__ import annotations

import argparse

import yaml
from _measure import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="YAML list of {prompt, expected: [Census assay labels]}")
    p.add_argument("--name", required=True)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.data.assay_names import assays_named

    with open(args.prompts) as f:
        items = yaml.safe_load(f)
    rows = []
    for item in items:
        read = assays_named(item["prompt"]).labels
        rows.append({"prompt": item["prompt"], "expected": sorted(item["expected"]), "read": sorted(read),
                     "right": sorted(read) == sorted(item["expected"])})
    named = [r for r in rows if r["expected"]]
    none = [r for r in rows if not r["expected"]]
    emit(args.out, [], bench="assay_names", name=args.name, prompts_file=args.prompts, prompts=len(rows),
         right=sum(r["right"] for r in rows), right_named=f"{sum(r['right'] for r in named)}/{len(named)}",
         right_none=f"{sum(r['right'] for r in none)}/{len(none)}",
         wrong=[{k: r[k] for k in ("prompt", "expected", "read")} for r in rows if not r["right"]])


if __name__ == "__main__":
    main()
