"""Screen a codec before CLOP and the DiT are trained on it: real cells of every val condition
(the evaluator's own conditions, halves and scoring: ``HeldoutSet``), encoded and sampled back to
counts (``codec_roundtrip``), against the real half, macro over all conditions, those some
training study has ("seen") and those none has ("new"), each a mean over 2 seeds of the halves.
The round trip is the ceiling of any generator in the codec's latent; the real half is the
ceiling of any generator at all. Needs the run's codec only (a run with its ``ae`` stage alone).

    python benchmarks/codec_screen.py --run RUN --shards SHARDS --name NAME \\
        --out benchmarks/results/codec_screen.jsonl

One JSON line per (generator, part). Session 18 screened its codec candidates with it
(benchmarks/results/val_rule_plan.md).
"""

from __future__ import annotations

import argparse

import numpy as np
from _measure import emit
from val_ablation import VAL_CONDITIONS

KEEP = ("identity_cell_type", "identity_tissue_general", "identity_disease", "energy", "mmd", "coverage")
SEEDS = (0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--name", required=True, help="label of this codec in the output lines")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.evaluate.baselines import codec_roundtrip, real_half
    from clopdit_dist.evaluate.evaluator import EvalConfig, HeldoutSet, _macro, baseline_rng, read_cells
    from clopdit_dist.models.codec import load_codec
    from clopdit_dist.run import RunDir

    cfg = EvalConfig(**VAL_CONDITIONS)  # the conditions val_ablation.py scores
    codec = load_codec(RunDir(args.run))
    train = read_cells(args.shards, "train", codec.genes, cfg.train_cells)
    hs = HeldoutSet("val", read_cells(args.shards, "val", codec.genes, 20_000), train, set(train.keys), cfg)
    rows: dict[tuple[str, int], list[dict]] = {}
    for seed in SEEDS:
        for i, meta in enumerate(hs.conditions):
            a_idx, b_idx = hs.halves(meta, seed)
            rng = baseline_rng(seed, i)  # the evaluator's own baseline draws
            for g, cells in (("real_half", real_half(hs.space, hs.real.counts[b_idx])),
                             ("codec_roundtrip", codec_roundtrip(hs.space, codec, hs.real.counts[b_idx], rng))):
                rows.setdefault((g, seed), []).append({**meta, **hs.score(meta, a_idx, cells)})
    results: list[dict] = []
    for g in ("real_half", "codec_roundtrip"):
        for part, keep in (("all", lambda r: True), ("seen", lambda r: not r["novel"]), ("new", lambda r: r["novel"])):
            macros = [_macro([r for r in rows[(g, s)] if keep(r)]) for s in SEEDS]
            emit(args.out, results, bench="codec_screen", name=args.name, run=args.run, split="val", generator=g,
                 part=part, conditions=sum(keep(r) for r in rows[(g, 0)]), seeds=len(SEEDS),
                 **{k: round(float(np.mean([m[k] for m in macros])), 4) for k in KEEP})


if __name__ == "__main__":
    main()
