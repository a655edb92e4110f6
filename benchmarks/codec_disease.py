"""How much of a disease's effect survives the codec round trip. For each (cell type, tissue,
disease) of a split with enough disease and normal cells of that type and tissue in one study, the
cells are split at random into halves A and B, and the difference of mean log1p CP10k between
disease and normal cells is taken in real half A (``dA``), in the codec's decoded means of half A
(``cA``) and in real half B (``dB``). Count noise makes ``dA`` and ``dB`` disagree in every gene;
it is independent between halves, so ``kept = (cA . dB) / (dA . dB)`` estimates the fraction of the
disease's effect the codec keeps (1: all of it; pooled over combinations as a ratio of sums), and
``cos_real = cos(dA, dB)`` is the ceiling of ``cos_codec = cos(cA, dB)``. Combinations no training
study has ("new") and seen ones apart.

On the embedded atlas the disease's programme genes are known (``data/biology.py``): ``programme_real``
and ``programme_codec`` are the same disease-minus-normal differences, of all cells, averaged over those
genes alone, so donor effects (which ride along in ``kept``) do not enter. ``--fit-pca K`` scores a PCA
codec fitted on training cells (``PCACodec.fit``) instead of the run's own: the linear reference.

    python benchmarks/codec_disease.py --run RUN --shards SHARDS --split val --min-cells 20 \\
        --out benchmarks/results/codec_disease.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _measure import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--min-cells", type=int, default=20, help="disease and normal cells each, per study")
    p.add_argument("--fit-pca", type=int, default=0, metavar="K", help="score a K-component PCA codec instead")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.data.biology import DISEASE_BY_NAME
    from clopdit_dist.data.conditions import CONDITION_FIELDS, train_conditions
    from clopdit_dist.evaluate.evaluator import read_cells
    from clopdit_dist.models.autoencoder import log_normalize
    from clopdit_dist.models.codec import PCACodec, load_codec
    from clopdit_dist.run import RunDir

    run = RunDir(args.run)  # needs the codec only: works on a run with no CLOP or DiT yet
    codec = load_codec(run)
    if args.fit_pca:
        codec = PCACodec.fit(read_cells(args.shards, "train", codec.genes, 20_000).counts, codec.genes, args.fit_pca)
    symbols = dict(zip(*(run.manifest().data["vocabulary"][k] for k in ("feature_id", "feature_name"))))
    gene_symbols = np.array([symbols.get(g, g) for g in codec.genes])
    seen = {tuple(c[f] for f in CONDITION_FIELDS) for c in train_conditions(run.manifest())}
    cells = read_cells(args.shards, args.split, codec.genes, 20_000)
    m = cells.meta
    x = torch.from_numpy(cells.counts)
    with torch.no_grad():
        decoded = codec.decode(codec.encode(x), x.sum(-1))["mu"]
    real, dec = log_normalize(x).numpy(), log_normalize(decoded).numpy()
    results: list[dict] = []
    common = {"bench": "codec_disease", "run": args.run, "split": args.split, "min_cells": args.min_cells,
              **({"codec": f"pca{args.fit_pca}"} if args.fit_pca else {})}
    combos = sorted({c for c in zip(m["cell_type"], m["tissue_general"], m["disease"]) if c[2] != "normal"})
    for t, s, d in combos:
        of = (m["cell_type"] == t) & (m["tissue_general"] == s)
        for study in sorted(set(m["dataset_id"][of & (m["disease"] == d)])):
            sick, well = of & (m["disease"] == d) & (m["dataset_id"] == study), \
                of & (m["disease"] == "normal") & (m["dataset_id"] == study)
            if min(sick.sum(), well.sum()) < args.min_cells:
                continue
            rng = np.random.default_rng(0)
            (sa, sb), (wa, wb) = _halves(np.flatnonzero(sick), rng), _halves(np.flatnonzero(well), rng)
            d_a, d_b = real[sa].mean(0) - real[wa].mean(0), real[sb].mean(0) - real[wb].mean(0)
            c_a = dec[sa].mean(0) - dec[wa].mean(0)
            programme = np.isin(gene_symbols, DISEASE_BY_NAME[d].program) if d in DISEASE_BY_NAME else []
            on_programme = {}
            if np.any(programme):  # every cell of the pair, the programme's genes only
                on_programme = {f"programme_{k}": float(e[sick][:, programme].mean() - e[well][:, programme].mean())
                                for k, e in (("real", real), ("codec", dec))}
            emit(args.out, results, **common, cell_type=t, tissue_general=s, disease=d, dataset_id=study,
                 new=(t, s, d) not in seen, n_disease=int(sick.sum()), n_normal=int(well.sum()),
                 kept=float(c_a @ d_b / (d_a @ d_b)), cos_codec=_cos(c_a, d_b), cos_real=_cos(d_a, d_b),
                 codec_dot=float(c_a @ d_b), real_dot=float(d_a @ d_b), **on_programme)
    rows = list(results)
    for new in (True, False):
        part = [r for r in rows if r["new"] == new]
        if part:
            # pooled over combinations (a ratio of sums: one combination's denominator can be near 0)
            # the programme's share over the pairs whose real cells carry it (a shift above 0.2 log units:
            # the types it acts on; on the others both shifts are noise around 0)
            acting = [r for r in part if r.get("programme_real", 0) > 0.2]
            emit(args.out, results, **common, summary="new" if new else "seen", combinations=len(part),
                 kept=sum(r["codec_dot"] for r in part) / sum(r["real_dot"] for r in part),
                 **{k: float(np.mean([r[k] for r in part])) for k in ("cos_codec", "cos_real")},
                 programme_pairs=len(acting), programme_kept=(sum(r["programme_codec"] for r in acting) /
                                                             sum(r["programme_real"] for r in acting)) if acting else None)


def _halves(idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(idx)
    return idx[: len(idx) // 2], idx[len(idx) // 2:]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


if __name__ == "__main__":
    main()
