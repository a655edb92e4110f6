"""Which cell types does a run's codec lose? Per cell type of a held-out split: real cells encoded
and sampled back to counts (the evaluator's ``codec_roundtrip``), judged by that split's kNN
cell-type judge (``HeldoutSet``). Beside it: the real cells' own accuracy (the cells the judge was
fitted on: a reference, not a ceiling) and the type's training count. The evaluation's conditions
leave out most rare types; this scores every type with >= 15 cells.

    python benchmarks/codec_types.py --run RUN --shards SHARDS [--split val] --name NAME --out F.jsonl

One JSON line per cell type, then one summary line: macro over types of the round trip's accuracy,
and over the types with fewer than 300 training cells.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from _measure import emit

RARE = 300  # training cells: below this a type counts as rare in the summary line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--name", required=True, help="label of this run in the output lines")
    p.add_argument("--min-cells", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.evaluate.baselines import codec_roundtrip, real_half
    from clopdit_dist.evaluate.evaluator import EvalConfig, HeldoutSet, read_cells
    from clopdit_dist.models.codec import load_codec
    from clopdit_dist.run import RunDir

    codec = load_codec(RunDir(args.run))
    with open(os.path.join(args.shards, "manifest.json")) as f:
        train_counts = json.load(f)["cell_types"]["train"]
    train = read_cells(args.shards, "train", codec.genes, 5000)
    real = read_cells(args.shards, args.split, codec.genes, 20000)
    cfg = EvalConfig(split=args.split, seeds=1)
    hs = HeldoutSet(args.split, real, train, set(train.keys), cfg)
    judge, rng = hs.judges["cell_type"], np.random.default_rng(0)
    results: list[dict] = []
    for cell_type in sorted(set(real.meta["cell_type"])):
        counts = real.counts[real.meta["cell_type"] == cell_type][:300]
        if len(counts) < args.min_cells:
            continue
        acc = {name: float((judge.predict(cs.embed) == cell_type).mean())
               for name, cs in (("real", real_half(hs.space, counts)),
                                ("roundtrip", codec_roundtrip(hs.space, codec, counts, rng)))}
        emit(args.out, results, bench="codec_types", name=args.name, run=args.run, split=args.split,
             cell_type=cell_type, train_cells=int(train_counts.get(cell_type, 0)), cells=len(counts),
             real_identity=round(acc["real"], 4), roundtrip_identity=round(acc["roundtrip"], 4))
    rare = [r["roundtrip_identity"] for r in results if r["train_cells"] < RARE]
    emit(args.out, [], bench="codec_types", name=args.name, run=args.run, split=args.split, summary=True,
         types=len(results), roundtrip_macro=round(float(np.mean([r["roundtrip_identity"] for r in results])), 4),
         rare_types=len(rare), roundtrip_macro_rare=round(float(np.mean(rare)), 4) if rare else None)


if __name__ == "__main__":
    main()
