"""Is the synthetic atlas worth evaluating generators on? One JSON line per result.

For held-out studies (the val + test studies that ``assign_splits`` picks), in PCA-50 of
log1p CP10k fitted on the real held-out cells, for the 12 largest held-out conditions
(cell_type, tissue_general, disease), compare a reference half of the real cells with:

  (a) ``real_half``   the other half of the real cells (the ceiling);
  (b) ``type_mean``   the training mean CP10k profile of the cell type × the real cells'
                      library sizes, with NB noise (theta = 10): "mean + count noise";
  (c) ``train_copy``  copies of training-study cells of the same condition (falling back to
                      same type and tissue, then same type, for combinations no training
                      study has; ``level`` says which);
  (d) ``train_gauss`` a Gaussian in PCA space fitted on those training cells;
  (c') ``train_copy_same_assay`` (c) from training cells of the held-out study's assay (same
      fallbacks), which a generator told the assay could match: what is left is study and
      donor effects.

The same comparison on held-out cells of *training* studies (``scope: training_studies``,
what ``val_cells``/``test_cells`` measure; PCA fitted on those conditions' training cells,
the type mean from the other cells) has no batch shift, so it isolates within-type structure.

Metrics: coverage (Naeem et al. 2020, k = 5: the fraction of reference cells whose k-NN
ball holds a generated cell) and the diversity ratio (mean pairwise distance of the
generated set / that of the reference half). An atlas worth evaluating on has (b) far below
(a) in coverage, and (c) visibly below (a): study and donor effects make held-out studies
genuinely new.

    python benchmarks/atlas_discrimination.py --cells 20000 --seeds 0 1

It needs only ``SyntheticAtlas``, ``SynthConfig``, ``assign_splits`` (with ``count_groups``) and ``ShardConfig``,
so it also runs against older versions of the package (``PYTHONPATH=old_checkout``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from clopdit_dist.data.plan import assign_splits, count_groups
from clopdit_dist.data.shards import ShardConfig
from clopdit_dist.data.synthetic import SynthConfig, SyntheticAtlas

KEYS = ["cell_type", "tissue_general", "disease"]


def emit(**row) -> None:
    print(json.dumps({"bench": "atlas_discrimination", **row}), flush=True)


def log_cp10k(X) -> np.ndarray:
    X = sp.csr_matrix(X, dtype=np.float64)
    lib = np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1.0)
    return np.log1p(X.multiply(1e4 / lib[:, None]).toarray()).astype(np.float32)


def coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> float:
    """Naeem et al. 2020: share of real points whose k-NN radius (within real) holds a fake point."""
    radius = NearestNeighbors(n_neighbors=k + 1).fit(real).kneighbors(real)[0][:, -1]
    nearest_fake = NearestNeighbors(n_neighbors=1).fit(fake).kneighbors(real)[0][:, 0]
    return float((nearest_fake < radius).mean())


def mean_pairwise(Z: np.ndarray) -> float:
    sq = (Z * Z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * Z @ Z.T, 0)
    n = len(Z)
    return float(np.sqrt(d2).sum() / max(n * (n - 1), 1))


def synthesize(n_cells: int, seed: int, n_genes: int, n_studies: int):
    atlas = SyntheticAtlas(SynthConfig(n_cells=n_cells, n_genes=n_genes, n_studies=n_studies, seed=seed))
    t0 = time.perf_counter()
    parts = [atlas.sample(s, min(atlas.cfg.chunk_size, n_cells - s)) for s in range(0, n_cells, atlas.cfg.chunk_size)]
    elapsed = time.perf_counter() - t0
    obs = pd.concat([p[0] for p in parts], ignore_index=True)
    obs["soma_joinid"] = np.arange(len(obs))
    X = sp.vstack([p[1] for p in parts], format="csr")
    return atlas, obs, X, elapsed


def run(seed: int, args, label: str) -> None:
    rng = np.random.default_rng([seed, 99])
    _, obs, X, elapsed = synthesize(args.cells, seed, args.genes, args.studies)
    emit(label=label, seed=seed, result="synthesis_seconds", cells=args.cells, genes=args.genes,
         seconds=round(elapsed, 2))
    splits = assign_splits(count_groups([obs]), ShardConfig(source="-", out="-", seed=args.split_seed))
    study_split = obs["dataset_id"].map(splits).to_numpy()
    held = np.isin(study_split, ["val", "test"])
    train = study_split == "train"
    cond = obs[KEYS].astype(str).agg(" | ".join, axis=1).to_numpy()
    ctype, tissue = obs["cell_type"].to_numpy(), obs["tissue_general"].to_numpy()
    assay = obs["assay"].to_numpy()
    train_conds = set(cond[train])
    unseen = pd.Series(cond[held & ~np.isin(cond, list(train_conds))]).value_counts()
    emit(label=label, seed=seed, result="splits", held_out_cells=int(held.sum()),
         held_out_conditions=len(set(cond[held])), unseen_held_out_conditions=len(unseen),
         unseen_with_30_cells={k: int(v) for k, v in unseen[unseen >= 30].items()})

    L = log_cp10k(X)
    lib = np.asarray(X.sum(axis=1)).ravel()
    prop = sp.csr_matrix(X, dtype=np.float64).multiply(1 / np.maximum(lib, 1)[:, None]).tocsr()

    def compare(scope, c, Z, project, ref, other, pool, level, type_pool, extra=None):
        n = len(other)
        fakes = {"real_half": Z[other]}
        # (b) training type-mean profile x the real cells' library sizes, NB(theta=10)
        mean_prop = np.asarray(prop[type_pool].mean(axis=0)).ravel()
        mu = lib[other][:, None] * mean_prop[None, :]
        theta = 10.0
        fakes["type_mean"] = project(log_cp10k(rng.poisson(rng.gamma(theta, mu / theta))))
        if pool is not None:  # (c) copies of training cells
            fakes["train_copy"] = Z[rng.choice(pool, n, replace=len(pool) < n)]
        for name, p in (extra or {}).items():
            fakes[name] = Z[rng.choice(p, n, replace=len(p) < n)]
        gpool = pool if pool is not None else other  # (d) Gaussian in PCA space
        zt = Z[gpool]
        cov = np.cov(zt, rowvar=False) + 1e-6 * np.eye(zt.shape[1])
        fakes["train_gauss"] = rng.multivariate_normal(zt.mean(0), cov, n).astype(np.float32)
        div_ref = mean_pairwise(Z[ref])
        out = []
        for method, F in fakes.items():
            row = {"scope": scope, "method": method, "coverage": coverage(Z[ref], F, k=5),
                   "diversity": mean_pairwise(F) / div_ref}
            out.append(row)
            emit(label=label, seed=seed, result="condition", scope=scope, condition=c, n_real=int(len(ref) + n),
                 train_level=level, n_train=len(gpool), in_train=c in train_conds, method=method,
                 coverage=round(row["coverage"], 4), diversity=round(row["diversity"], 4))
        return out

    rows = []
    # held-out studies: PCA fitted on their real cells
    pca = PCA(n_components=50, random_state=0).fit(L[held])
    Z = pca.transform(L).astype(np.float32)
    project = lambda M: pca.transform(M).astype(np.float32)
    for c in pd.Series(cond[held]).value_counts().index[: args.conditions]:
        idx = rng.permutation(np.flatnonzero(held & (cond == c)))
        ref, other = idx[: len(idx) // 2], idx[len(idx) // 2:]
        ct, ti, _ = c.split(" | ")
        # training cells of the condition, or the closest thing training has (also on the assay)
        def closest(mask, c=c, ct=ct, ti=ti):
            for level, sel in (("condition", cond == c), ("type+tissue", (ctype == ct) & (tissue == ti)),
                               ("type", ctype == ct)):
                pool = np.flatnonzero(mask & sel)
                if len(pool) >= 10:
                    return level, pool
            return level, pool

        level, pool = closest(train)
        same_assay = closest(train & (assay == assay[idx[0]]))[1]
        rows += compare("held_out_studies", c, Z, project, ref, other, pool, level,
                        np.flatnonzero(train & (ctype == ct)),
                        {"train_copy_same_assay": same_assay} if len(same_assay) else None)
    # held-out cells of training studies (what val_cells/test_cells measure): no batch shift, so
    # (a) = (c) there; the question is how far the type mean is from real cells
    big = pd.Series(cond[train]).value_counts().index[: args.conditions]
    within = np.flatnonzero(train & np.isin(cond, big))
    pca_w = PCA(n_components=50, random_state=0).fit(L[within])
    Zw = pca_w.transform(L).astype(np.float32)
    project_w = lambda M: pca_w.transform(M).astype(np.float32)
    for c in big:
        idx = rng.permutation(np.flatnonzero(train & (cond == c)))[:1000]
        ref, other = idx[: len(idx) // 2], idx[len(idx) // 2:]
        ct = c.split(" | ")[0]
        type_pool = np.setdiff1d(np.flatnonzero(train & (ctype == ct)), ref)
        rows += compare("training_studies", c, Zw, project_w, ref, other, None, "condition", type_pool)
    df = pd.DataFrame(rows)
    macro = df.groupby(["scope", "method"], sort=False).agg(coverage=("coverage", "mean"),
                                                             diversity=("diversity", "mean"),
                                                             conditions=("coverage", "size"))
    for (scope, method), r in macro.iterrows():
        emit(label=label, seed=seed, result="macro", scope=scope, method=method, conditions=int(r["conditions"]),
             coverage=round(float(r["coverage"]), 4), diversity=round(float(r["diversity"]), 4),
             coverage_vs_real=round(float(r["coverage"] / macro.loc[(scope, "real_half"), "coverage"]), 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=3_000)
    p.add_argument("--studies", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--split-seed", type=int, default=0, help="ShardConfig.seed for assign_splits")
    p.add_argument("--conditions", type=int, default=12)
    p.add_argument("--label", default="current")
    args = p.parse_args()
    for seed in args.seeds:
        run(seed, args, args.label)


if __name__ == "__main__":
    main()
