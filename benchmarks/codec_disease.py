"""How much of a disease's effect survives the codec round trip: for each (cell type, tissue,
disease) of a split with enough disease and normal cells of that type and tissue in one study,
the difference of mean log1p CP10k between disease and normal cells, in real cells and in the
codec's decoded means of the same cells. ``kept`` is the norm ratio (decoded / real), ``cos``
their cosine; a codec that keeps the disease programme gives both near 1. Combinations no
training study has ("new") and seen ones are reported apart.

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
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.evaluate.evaluator import read_cells
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.autoencoder import log_normalize

    gen = CellGenerator.from_run(args.run)
    cells = read_cells(args.shards, args.split, gen.codec.genes, 20_000)
    m = cells.meta
    x = torch.from_numpy(cells.counts)
    with torch.no_grad():
        decoded = gen.codec.decode(gen.codec.encode(x), x.sum(-1))["mu"]
    real, dec = log_normalize(x).numpy(), log_normalize(decoded).numpy()
    results: list[dict] = []
    common = {"bench": "codec_disease", "run": args.run, "split": args.split, "min_cells": args.min_cells}
    combos = sorted({c for c in zip(m["cell_type"], m["tissue_general"], m["disease"]) if c[2] != "normal"})
    for t, s, d in combos:
        of = (m["cell_type"] == t) & (m["tissue_general"] == s)
        for study in sorted(set(m["dataset_id"][of & (m["disease"] == d)])):
            sick, well = of & (m["disease"] == d) & (m["dataset_id"] == study), \
                of & (m["disease"] == "normal") & (m["dataset_id"] == study)
            if min(sick.sum(), well.sum()) < args.min_cells:
                continue
            dr, dc = real[sick].mean(0) - real[well].mean(0), dec[sick].mean(0) - dec[well].mean(0)
            emit(args.out, results, **common, cell_type=t, tissue_general=s, disease=d, dataset_id=study,
                 new=(t, s, d) not in gen._train_combinations, n_disease=int(sick.sum()), n_normal=int(well.sum()),
                 kept=float(np.linalg.norm(dc) / np.linalg.norm(dr)),
                 cos=float(dc @ dr / (np.linalg.norm(dc) * np.linalg.norm(dr))))
    rows = list(results)
    for new in (True, False):
        part = [r for r in rows if r["new"] == new]
        if part:
            emit(args.out, results, **common, summary="new" if new else "seen", combinations=len(part),
                 kept=float(np.mean([r["kept"] for r in part])), cos=float(np.mean([r["cos"] for r in part])))


if __name__ == "__main__":
    main()
