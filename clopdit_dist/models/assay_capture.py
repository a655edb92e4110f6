"""Per-assay capture profiles estimated from training cells, and the shift that gives a
generated cell the capture of the assay a prompt names.

Assays capture genes at different rates (3' against 5' chemistry, full-length protocols): to
first order each assay adds its own per-gene offset to log expression, the batch covariate
that count models of single-cell data put in their decoder (scVI: Lopez et al., Nat. Methods
2018). A generator trained on (cell type, tissue, disease) reproduces the capture of the
training studies its condition came from; a prompt that names another assay asks for that
assay's.

Estimate (:meth:`CapturePseudobulks.estimate`), from training cells only and without any
model: each study's healthy cells of each cell type become a pseudobulk (mean proportions); the
log pseudobulks are fitted as cell-type effect + study effect by alternating weighted means
(weights: cells); an assay's effect is the mean of its studies' effects, centred over assays.
Studies nest in assays, so this is the assay's main effect with the studies' own batches
averaged out, as far as the assay has studies to average (on the embedded atlas, 5-7 per
assay, correlation 0.75-0.78 with the true capture: ``benchmarks/assay_transfer.py``).
Confounded with whatever else separates the assays' studies (their tissues, donors).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

HEALTHY = "normal"  # Census's disease label of healthy donors: pseudobulks from these cells only


class CapturePseudobulks:
    """Running sums of the healthy cells' proportions per (study, cell type), and each study's
    assay: streamed batch by batch, bounded memory (studies x types x genes)."""

    def __init__(self, n_genes: int):
        self.n_genes = n_genes
        self.sums: dict[tuple[str, str], np.ndarray] = {}
        self.cells: Counter = Counter()
        self.assay_cells: dict[str, Counter] = {}

    def add(self, counts: np.ndarray, meta: dict) -> None:
        """``counts`` (cells, genes); ``meta`` with ``dataset_id``, ``cell_type``, ``disease``, ``assay``."""
        study, ctype = np.asarray(meta["dataset_id"]), np.asarray(meta["cell_type"])
        healthy, assay = np.asarray(meta["disease"]) == HEALTHY, np.asarray(meta["assay"])
        for s in np.unique(study):
            self.assay_cells.setdefault(str(s), Counter()).update(assay[study == s].tolist())
        x = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        keys = np.char.add(np.char.add(study.astype(str), "\x1f"), ctype.astype(str))
        for k in np.unique(keys[healthy]):
            rows = healthy & (keys == k)
            key = tuple(k.split("\x1f"))
            self.sums[key] = self.sums.get(key, 0.0) + x[rows].sum(0, dtype=np.float64)
            self.cells[key] += int(rows.sum())

    def estimate(self, min_cells: int = 10, iterations: int = 50) -> dict[str, np.ndarray]:
        """Per assay, its log-scale gene effect, centred over assays (the module docstring); empty
        where no pseudobulk has ``min_cells`` cells."""
        keys = [k for k, n in self.cells.items() if n >= min_cells]
        if not keys:
            return {}
        studies, types = sorted({s for s, _ in keys}), sorted({t for _, t in keys})
        si = np.array([studies.index(s) for s, _ in keys])
        ti = np.array([types.index(t) for _, t in keys])
        w = np.array([self.cells[k] for k in keys], float)
        y = np.log(np.stack([self.sums[k] / self.cells[k] for k in keys]) + 1e-5)
        u = np.zeros((len(studies), self.n_genes))
        for _ in range(iterations):
            alpha = np.stack([np.average(y[ti == t] - u[si[ti == t]], axis=0, weights=w[ti == t])
                              for t in range(len(types))])
            resid = y - alpha[ti]
            u = np.stack([np.average(resid[si == s], axis=0, weights=w[si == s]) for s in range(len(studies))])
            u -= u.mean(0)
        assay_of = self.study_assays()
        effects = {a: np.mean([u[i] for i, s in enumerate(studies) if assay_of[s] == a], 0)
                   for a in sorted(set(assay_of.values()))}
        centre = np.mean(list(effects.values()), 0)
        return {a: (e - centre).astype(np.float32) for a, e in effects.items()}

    def study_assays(self) -> dict[str, str]:
        """Each study's assay: the most common among its cells."""
        return {s: c.most_common(1)[0][0] for s, c in self.assay_cells.items()}

    def statistics(self, min_cells: int = 10) -> dict:
        """What a run keeps (``latent_stats.json``'s ``assay_capture``): effects per assay and
        the studies behind each."""
        effects = self.estimate(min_cells)
        studies = Counter(self.study_assays().values())
        return {"effects": {a: [round(float(v), 4) for v in e] for a, e in effects.items()},
                "studies": {a: int(studies[a]) for a in effects},
                "pseudobulks": int(sum(n >= min_cells for n in self.cells.values()))}


def estimate_capture(counts: np.ndarray, meta: dict, min_cells: int = 10) -> dict[str, np.ndarray]:
    """:meth:`CapturePseudobulks.estimate` of one array of cells."""
    acc = CapturePseudobulks(counts.shape[1])
    acc.add(counts, meta)
    return acc.estimate(min_cells)


def capture_statistics(shards: str, genes: list[str], max_cells: int = 200_000) -> dict:
    """:meth:`CapturePseudobulks.statistics` of up to ``max_cells`` training cells of ``shards``
    (in shard order: on an atlas larger than that, the studies of its first shards)."""
    from ..data.loader import iter_split

    acc = CapturePseudobulks(len(genes))
    for batch in iter_split(shards, "train", genes, max_cells, batch_size=2048,
                            fields=("dataset_id", "cell_type", "disease", "assay")):
        acc.add(batch["counts"].numpy(), batch)
    return acc.statistics()


def capture_shift(effects: dict[str, np.ndarray], target: str, source: dict[str, float]) -> np.ndarray:
    """The log-scale shift that moves cells whose capture is the mixture ``source`` (assay ->
    weight) to ``target``'s: ``effect[target] - sum_a w_a effect[a]`` (weights normalised; an
    assay without an estimate counts as the assays' centre, 0)."""
    total = sum(source.values())
    mixed = sum((w / total) * np.asarray(effects[a]) for a, w in source.items() if a in effects and total > 0)
    return np.asarray(effects[target], np.float32) - np.asarray(mixed, np.float32)


def add_to_run(run_dir: str, shards: str) -> dict:
    """Write the capture estimate of ``shards`` (the run's own: checked by manifest sha256) into a
    trained run whose ``dit/latent_stats.json`` predates it (``clopdit assay-capture``)."""
    import json
    import os

    from ..data.manifest import write_json_atomic
    from ..errors import RunDirError
    from ..run import RunDir
    from .codec import load_codec

    run = RunDir(run_dir)
    run.info()  # a run directory of this schema, or a one-line RunDirError (init would create one)
    run.init(shards)  # raises unless the run was trained on these shards
    path = os.path.join(run.stage_dir("dit"), "latent_stats.json")
    if not os.path.exists(path):
        raise RunDirError(f"{run_dir} has no trained DiT ({path} is missing): train it, which writes the estimate")
    with open(path) as f:
        stats = json.load(f)
    stats["assay_capture"] = capture_statistics(shards, load_codec(run).genes)
    write_json_atomic(path, stats)
    return stats["assay_capture"]
