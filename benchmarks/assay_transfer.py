"""What the held-out studies' tissue and disease judges read: the assay's capture profile.

Every held-out study of the embedded atlas has its tissue in exactly one training study, often of
another assay (10x 3' v3 against 10x 5' v2), and each assay scales every gene by its own capture
factor (``SyntheticAtlas.assay_capture``). A generator asked for (cell type, tissue, disease) alone
reproduces the training study's assay; the kNN judges, fitted on the held-out studies' own cells,
read the capture profile as much as the tissue. This scores, on a held-out set's conditions that
training has, copies of training cells of the condition (the evaluator's ``training_copies`` draw)
passed through the run's codec:

* ``copies_codec``: as they are (their study's assay);
* ``copies_assay_true``: with the atlas's true capture of the held-out cells' assay in place of
  their own (log-scale, renormalised): what a generator told the assay could reach;
* ``copies_assay_estimated``: the same with capture effects estimated from training cells only
  (:func:`~clopdit_dist.models.assay_capture.estimate_capture`, what a run keeps and generation
  applies since session 25): what one could build without the atlas's truth;

beside ``real_half`` and the raw ``training_copies``, by ``HeldoutSet.score`` with the evaluator's
draws. One line per generator: the macro over conditions, mean and 95% interval over evaluation
seeds; one line with the estimate's correlation with the truth.

    python benchmarks/assay_transfer.py --run RUN --shards SHARDS --atlas-seed 0 --split val --name s0 \\
        --out benchmarks/results/assay_transfer.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch
from _measure import add_atlas_run_args, atlas_columns, emit

KEEP = ("identity_cell_type", "identity_tissue_general", "identity_disease", "energy_u", "mmd_u")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_atlas_run_args(p, split="val")
    args = p.parse_args()

    from clopdit_dist.data.conditions import condition_key
    from clopdit_dist.data.synthetic import SynthConfig, SyntheticAtlas
    from clopdit_dist.evaluate import metrics as M
    from clopdit_dist.evaluate.baselines import CellSet
    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, _macro, baseline_rng, read_cells
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.assay_capture import estimate_capture
    from clopdit_dist.models.autoencoder import nb_sample

    cfg = EvalConfig(split=args.split, seeds=args.seeds, report=False)
    ev = Evaluation(CellGenerator.from_run(args.run), args.shards, cfg, progress=False)
    train = ev.train
    real = read_cells(args.shards, args.split, ev.genes, 20_000)
    hs = HeldoutSet("studies", real, train, ev.train_keys, cfg)
    atlas = SyntheticAtlas(SynthConfig(n_cells=args.atlas_cells, seed=args.atlas_seed))
    col = atlas_columns(atlas, ev.genes)
    true = {a: atlas.assay_capture[i][col] for i, a in enumerate(atlas.assays)}
    estimated = estimate_capture(train.counts, train.meta)
    theta = torch.from_numpy(ev.theta)

    def swapped(mu: torch.Tensor, effect: dict, source: np.ndarray, target: str, g) -> np.ndarray:
        shift = torch.from_numpy(np.stack([effect[target] - effect[s] for s in source]))
        m = mu * shift.exp()
        m = m / m.sum(-1, keepdim=True) * mu.sum(-1, keepdim=True)
        return nb_sample(m, theta.expand_as(m), g).numpy()

    per_seed: dict[str, list[list[dict]]] = {}
    seen = [(i, meta) for i, meta in enumerate(hs.conditions) if not meta["novel"]]
    for seed in range(args.seeds):
        for i, meta in seen:
            a, b = hs.halves(meta, seed)
            target = Counter(real.meta["assay"][hs.real_keys == condition_key(meta)]).most_common(1)[0][0]
            pick = np.flatnonzero(train.keys == condition_key(meta))
            pick = pick[baseline_rng(seed, i).integers(len(pick), size=len(b))]
            x = torch.from_numpy(train.counts[pick])
            with torch.no_grad():
                mu = ev.codec.decode(ev.codec.encode(x), x.sum(-1))["mu"]
            g = torch.Generator().manual_seed(int(np.random.default_rng([seed, 31, i]).integers(2**31)))
            source = train.meta["assay"][pick]
            sets = {"real_half": CellSet.from_counts(hs.space, real.counts[b]),
                    "training_copies": CellSet.from_counts(hs.space, train.counts[pick]),
                    "copies_codec": CellSet.from_counts(hs.space, nb_sample(mu, theta.expand_as(mu), g).numpy()),
                    "copies_assay_true": CellSet.from_counts(hs.space, swapped(mu, true, source, target, g))}
            if target in estimated and set(source) <= set(estimated):
                sets["copies_assay_estimated"] = CellSet.from_counts(hs.space,
                                                                     swapped(mu, estimated, source, target, g))
            for name, cs in sets.items():
                per_seed.setdefault(name, [[] for _ in range(args.seeds)])[seed].append(hs.score(meta, a, cs))
    results: list[dict] = []
    for name, seeds in per_seed.items():
        macros = [_macro(rows) for rows in seeds]
        emit(args.out, results, bench="assay_transfer", name=args.name, run=args.run, split=args.split,
             atlas_seed=args.atlas_seed, generator=name, conditions=len(seeds[0]), seeds=args.seeds,
             **{k: M.mean_ci([m[k] for m in macros]) for k in KEEP})
    expressed = train.counts.sum(0) > 0
    pairs = [(a, c) for a in estimated for c in estimated if a < c]
    emit(args.out, results, bench="assay_transfer_estimate", name=args.name, atlas_seed=args.atlas_seed,
         assays={a: int(sum(1 for s in set(train.meta["dataset_id"]) if Counter(
             train.meta["assay"][train.meta["dataset_id"] == s]).most_common(1)[0][0] == a)) for a in estimated},
         corr_with_truth={f"{a} - {c}": float(np.corrcoef((estimated[a] - estimated[c])[expressed],
                                                          (true[a] - true[c])[expressed])[0, 1]) for a, c in pairs})


if __name__ == "__main__":
    main()
