"""What a perfect generator scores in ``clopdit evaluate``'s fidelity comparison.

On the embedded synthetic atlas every cell's true NB mean is known (``SyntheticAtlas.sample(...,
with_means=True)``), so the atlas's own generative process can be scored as a generator: for each
held-out cell of half B, fresh counts drawn around its true mean (scaled to its observed library,
as the codec round trip uses it) at the atlas's true inverse dispersion. No generator can do
better than that in expectation; it is what "realistic" means here. Scored beside the
evaluator's own baselines, drawn with the evaluator's own seeds (so their rows reproduce
``metrics.json``), by ``HeldoutSet.score``, on the held-out cells of training studies
(``--set cells``, ``<split>_cells``: the fidelity and cells-memorisation floors' set) or on the
held-out studies (``--set studies``: the identity, generalisation, decoded-mean diversity and
studies-memorisation floors' set):

* ``oracle``: true means, true dispersion (its ``diversity_means``, from the true means, is the
  most a generator's decoded means can show);
* ``oracle_training_batch``: the same with each cell's own study batch and donor effect
  (``SyntheticAtlas.study_effects``) replaced by the training studies' average: the perfect generator
  that knows a cell's labels but not its study, which is what a generator conditioned on cell type,
  tissue and disease can know of a held-out study (its tissue and disease identity there is what such
  a generator can reach);
* ``oracle_training_mixture``: the same with a drawn training study's batch and donor effect instead
  (:func:`training_study_effects`): the perfect generator that reproduces the training studies' batch
  mixture of a cell's condition, as a generator trained on training studies' cells does by default;
* ``oracle_codec_theta``: true means, the codec's dispersion: what the codec's dispersion costs;
* ``codec_true_theta``: the codec's decoded means of the real half (the round trip) at the true
  dispersion: what the codec's means cost;
* the evaluator's ``real_half``, ``codec_roundtrip``, ``training_copies``, ``gaussian``,
  ``type_mean_nb``.

One line per generator and part (``seen``: the conditions some training study has; ``all``: every
condition, as the identity floors read it, without the copies and the Gaussian where some have no
training cells; ``novel``: the combinations no training study has, as the unseen-combination floor
reads them): the macro over conditions, mean and 95% interval over the evaluation seeds, and
``*_over_gaussian`` / ``*_over_copies`` (energy, MMD, W2: the floors' ratios, mean over seeds over the
Gaussian's or the training copies').
One more line compares the codec's per-gene dispersion with the atlas's. The run's DiT is not
sampled (its numbers are in the run's ``metrics.json``).

    python benchmarks/oracle_fidelity.py --run RUN --shards SHARDS --atlas-seed 0 --name s0 \\
        --out benchmarks/results/oracle_fidelity.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _measure import add_atlas_run_args, atlas_columns, emit

KEEP = ("energy", "energy_u", "mmd", "mmd_u", "w2", "coverage", "diversity", "diversity_means",
        "memorisation_ratio", "identity_cell_type", "identity_tissue_general", "identity_disease")


def training_study_effects(atlas, obs, train: list[int], rng: np.random.Generator) -> np.ndarray:
    """For each cell, the study batch and donor effect of a training study drawn for it: one whose tissues
    include the cell's tissue and, for a diseased cell, whose disease is the cell's (by its cells; any training
    study where none is), and a random donor of it: where a generator that reproduces the training studies'
    batch mixture of the cell's condition puts it."""
    out = np.empty((len(obs), atlas.cfg.n_genes), np.float32)
    for r, (tissue, disease) in enumerate(zip(obs["tissue_general"], obs["disease"])):
        fits = [i for i in train if tissue in atlas.studies[i].tissues
                and (disease == "normal" or disease in atlas.studies[i].diseases)] or train
        w = np.array([atlas.studies[i].n_cells for i in fits], float)
        si = fits[rng.choice(len(fits), p=w / w.sum())]
        out[r] = atlas.study_batch[si] + atlas.donor_effect[si][rng.integers(len(atlas.studies[si].donors))]
    return out


def true_means(atlas, joinids: np.ndarray, genes: list[str], counts: np.ndarray,
               train_studies: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's true NB mean over ``genes``, regenerated from its atlas chunk, and as proportions the same
    mean with the cell's study and donor effects replaced by the training studies' average, and by a drawn
    training study's (:func:`training_study_effects`); the regenerated counts must equal ``counts`` (the
    shards' copy), which checks that the means belong to these very cells."""
    col = atlas_columns(atlas, genes)
    size = atlas.cfg.chunk_size
    train = [i for i, s in enumerate(atlas.studies) if s.dataset_id in set(train_studies)]
    average = np.mean([atlas.study_batch[i] + atlas.donor_effect[i].mean(0) for i in train], axis=0)
    out = np.empty((len(joinids), len(genes)), np.float32)
    batch_free, mixture = np.empty_like(out), np.empty_like(out)
    rng = np.random.default_rng([atlas.cfg.seed, 29])
    for start in np.unique(joinids // size * size):
        n = min(size, atlas.cfg.n_cells - int(start))
        obs, X, mu = atlas.sample(int(start), n, with_means=True)
        rows = np.flatnonzero(joinids // size * size == start)
        local = joinids[rows] - start
        if not np.array_equal(X[local][:, col].toarray(), counts[rows]):
            raise SystemExit(f"the atlas (seed {atlas.cfg.seed}, {atlas.cfg.n_cells} cells) does not reproduce the "
                             "shards' counts: pass the --atlas-seed and --atlas-cells the shards were built from")
        out[rows] = mu[local][:, col]
        own = np.log(mu[local]) - atlas.study_effects(obs.iloc[local])
        for target, effect in ((batch_free, average), (mixture, training_study_effects(atlas, obs.iloc[local], train,
                                                                                      rng))):
            logit = own + effect  # softmax: shift-free
            p = np.exp(logit - logit.max(axis=1, keepdims=True))
            target[rows] = (p / p.sum(axis=1, keepdims=True))[:, col]
    return out, batch_free, mixture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_atlas_run_args(p, split="test")
    p.add_argument("--set", choices=("cells", "studies"), default="cells")
    args = p.parse_args()

    from clopdit_dist.data.loader import iter_split
    from clopdit_dist.data.manifest import Manifest
    from clopdit_dist.data.synthetic import SynthConfig, SyntheticAtlas
    from clopdit_dist.evaluate import metrics as M
    from clopdit_dist.evaluate.baselines import CellSet
    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, _macro, baseline_rng, read_cells
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.autoencoder import nb_sample

    cfg = EvalConfig(split=args.split, seeds=args.seeds, report=False)  # the evaluator's defaults
    ev = Evaluation(CellGenerator.from_run(args.run), args.shards, cfg, progress=False)
    split = f"{args.split}_cells" if args.set == "cells" else args.split
    real = read_cells(args.shards, split, ev.genes, 20_000)
    joinids = np.concatenate([b["soma_joinid"].numpy() for b in iter_split(
        args.shards, split, ev.genes, 20_000, batch_size=2048)])[: len(real.counts)]
    atlas = SyntheticAtlas(SynthConfig(n_cells=args.atlas_cells, seed=args.atlas_seed))
    mu_true, p_batch_free, p_mixture = true_means(atlas, joinids, ev.genes, real.counts,
                                       Manifest.load(args.shards).studies("train"))
    col = atlas_columns(atlas, ev.genes)
    theta_true = torch.from_numpy(atlas.theta[col].copy())
    theta_codec = torch.from_numpy(ev.theta)
    hs = HeldoutSet(args.set, real, ev.train, ev.train_keys, cfg)

    def drawn(mu: torch.Tensor, theta: torch.Tensor, g: torch.Generator, mean_embed=None) -> CellSet:
        return CellSet.from_counts(hs.space, nb_sample(mu, theta.expand_as(mu), g).numpy(), mean_embed=mean_embed)

    per_seed: dict[str, list[list[dict]]] = {}
    for seed in range(args.seeds):
        for i, meta in enumerate(hs.conditions):  # the evaluator's index i, so its draws are the same
            a, b = hs.halves(meta, seed)
            sets = ev.baselines(hs, meta, b, len(b), baseline_rng(seed, i))
            x = torch.from_numpy(real.counts[b])
            lib = x.sum(-1, keepdim=True)
            mu = torch.from_numpy(mu_true[b])
            mu = mu / mu.sum(-1, keepdim=True) * lib
            with torch.no_grad():
                mu_codec = ev.codec.decode(ev.codec.encode(x), lib[:, 0])["mu"]
            g = torch.Generator().manual_seed(int(np.random.default_rng([seed, 23, i]).integers(2**31)))
            sets["oracle"] = drawn(mu, theta_true, g, mean_embed=hs.space.embed(mu.numpy()))
            sets["oracle_codec_theta"] = drawn(mu, theta_codec, g)
            sets["codec_true_theta"] = drawn(mu_codec, theta_true, g, mean_embed=hs.space.embed(mu_codec.numpy()))
            p_bf = torch.from_numpy(p_batch_free[b])
            sets["oracle_training_batch"] = drawn(p_bf / p_bf.sum(-1, keepdim=True) * lib, theta_true, g)
            p_mix = torch.from_numpy(p_mixture[b])
            sets["oracle_training_mixture"] = drawn(p_mix / p_mix.sum(-1, keepdim=True) * lib, theta_true, g)
            for name, cs in sets.items():
                if cs is not None:
                    per_seed.setdefault(name, [[] for _ in range(args.seeds)])[seed].append(
                        {"novel": meta["novel"], **hs.score(meta, a, cs, memorisation=True)})
    # "seen": the conditions some training study has (the floors' ratios); "all": every condition, as the identity
    # floors read it, for the generators that have cells for every one (not the copies and the Gaussian where some
    # combination has no training cells)
    results: list[dict] = []
    any_novel = any(m["novel"] for m in hs.conditions)
    parts = [("seen", lambda r: not r["novel"]), ("all", lambda r: True)] + [("novel", lambda r: r["novel"])] * any_novel
    for part, keep in parts:
        names = [n for n in per_seed if part == "seen" or not (any_novel and n in ("training_copies", "gaussian"))]
        macros = {n: [_macro([r for r in rows if keep(r)]) for rows in per_seed[n] if any(keep(r) for r in rows)]
                  for n in names}
        refs = {base: {k: np.mean([m[k] for m in macros[name]]) for k in ("energy", "mmd", "w2")}
                for base, name in (("gaussian", "gaussian"), ("copies", "training_copies")) if name in macros}
        for name, ms in macros.items():
            row = {k: M.mean_ci([m.get(k, np.nan) for m in ms]) for k in KEEP if any(k in m for m in ms)}
            ratios = {f"{k}_over_{base}": float(np.mean([m[k] for m in ms]) / ref[k])
                      for base, ref in refs.items() for k in ref}
            emit(args.out, results, bench="oracle_fidelity", name=args.name, run=args.run, set=args.set, split=split,
                 part=part, atlas_seed=args.atlas_seed, generator=name,
                 conditions=sum(keep(m) for m in hs.conditions), seeds=args.seeds, **ratios, **row)
    ratio = (theta_codec / theta_true).numpy()
    emit(args.out, results, bench="oracle_fidelity_dispersion", name=args.name, run=args.run,
         atlas_seed=args.atlas_seed, genes=len(ratio), clipped=int((theta_codec >= 9999).sum()),
         **{f"codec_over_true_q{q}": float(np.quantile(ratio, q / 100)) for q in (10, 25, 50, 75, 90)})


if __name__ == "__main__":
    main()
