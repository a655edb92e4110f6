"""Per-gene, per-cell-type and per-condition statistics gathered while shards are built.

Each shard writes sufficient statistics (sums, sums of squares, counts); the manifest is
their reduction. Normalisation is the usual one: counts per 10k (CP10k), then log1p.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

TARGET_SUM = 1e4
LIBRARY_KEYS = ("cell_type", "tissue_general", "disease", "assay")
CONDITION_KEYS = LIBRARY_KEYS[:3]  # a condition: what a caption names and evaluation groups by


def cp10k(X: sp.csr_matrix, library_size: np.ndarray) -> sp.csr_matrix:
    """Counts per 10k of each cell's library size (same sparsity pattern as X)."""
    scale = TARGET_SUM / np.maximum(library_size, 1.0)
    return sp.csr_matrix((X.data * np.repeat(scale, np.diff(X.indptr)), X.indices, X.indptr), shape=X.shape)


class ShardStats:
    """Sufficient statistics of one shard's cells."""

    def __init__(self, n_genes: int):
        self.n_genes = n_genes
        self.n_cells = 0
        self.sum_log = np.zeros(n_genes)
        self.sumsq_log = np.zeros(n_genes)
        self.sum_cp10k = np.zeros(n_genes)
        self.sumsq_cp10k = np.zeros(n_genes)
        self.nnz = np.zeros(n_genes, np.int64)
        self.type_names: list[str] = []
        self.type_cells: list[int] = []
        self.type_sum_log: list[np.ndarray] = []
        self.type_nnz: list[np.ndarray] = []
        self.library: dict[tuple, list[float]] = {}  # key -> [n, sum log L, sum (log L)^2]
        self.ontology: set[tuple[str, str, str]] = set()  # (field, label, ontology term id)

    def update(self, X: sp.csr_matrix, obs: pd.DataFrame) -> None:
        G = self.n_genes
        lib = np.asarray(X.sum(axis=1)).ravel()
        cp = cp10k(X, lib).data
        lg = np.log1p(cp)
        genes = X.indices
        self.n_cells += X.shape[0]
        for acc, w in ((self.sum_cp10k, cp), (self.sumsq_cp10k, cp * cp), (self.sum_log, lg),
                       (self.sumsq_log, lg * lg)):
            acc += np.bincount(genes, weights=w, minlength=G)
        self.nnz += np.bincount(genes, minlength=G)
        # per cell type: one sparse product of a type indicator with the log matrix
        codes, names = pd.factorize(obs["cell_type"].astype(str), sort=False)
        onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(names), len(codes)))
        LG = sp.csr_matrix((lg, X.indices, X.indptr), shape=X.shape)
        NZ = sp.csr_matrix((np.ones_like(lg), X.indices, X.indptr), shape=X.shape)
        type_sum, type_nnz = (onehot @ LG).toarray(), (onehot @ NZ).toarray()
        for t, name in enumerate(names):
            if name not in self.type_names:
                self.type_names.append(name)
                self.type_cells.append(0)
                self.type_sum_log.append(np.zeros(G, np.float32))
                self.type_nnz.append(np.zeros(G, np.int32))
            i = self.type_names.index(name)
            self.type_cells[i] += int((codes == t).sum())
            self.type_sum_log[i] += type_sum[t].astype(np.float32)
            self.type_nnz[i] += type_nnz[t].astype(np.int32)
        for f in CONDITION_KEYS:
            if f"{f}_ontology_term_id" in obs:
                pairs = obs[[f, f"{f}_ontology_term_id"]].astype(str).drop_duplicates().to_numpy()
                self.ontology |= {(f, label, term) for label, term in pairs}
        loglib = np.log(np.maximum(lib, 1.0))
        groups = pd.DataFrame({k: obs[k].astype(str).to_numpy() for k in LIBRARY_KEYS})
        groups["v"], groups["v2"] = loglib, loglib**2
        for key, row in groups.groupby(list(LIBRARY_KEYS), sort=True).agg(n=("v", "size"), s=("v", "sum"),
                                                                         ss=("v2", "sum")).iterrows():
            acc = self.library.setdefault(tuple(key), [0, 0.0, 0.0])
            acc[0] += int(row["n"])
            acc[1] += float(row["s"])
            acc[2] += float(row["ss"])

    # ---------------------------------------------------------------- files
    def save(self, path: str) -> None:
        """npz of numeric arrays (no pickle) plus the names and library groups as arrays."""
        lib_keys = np.array(["\x1f".join(k) for k in self.library], dtype=str)
        lib_vals = np.array(list(self.library.values()), dtype=np.float64).reshape(-1, 3)
        T = len(self.type_names)
        np.savez(path, n_cells=self.n_cells, sum_log=self.sum_log, sumsq_log=self.sumsq_log,
                 sum_cp10k=self.sum_cp10k, sumsq_cp10k=self.sumsq_cp10k, nnz=self.nnz,
                 type_names=np.array(self.type_names, dtype=str), type_cells=np.array(self.type_cells, np.int64),
                 type_sum_log=np.stack(self.type_sum_log) if T else np.zeros((0, self.n_genes), np.float32),
                 type_nnz=np.stack(self.type_nnz) if T else np.zeros((0, self.n_genes), np.int32),
                 lib_keys=lib_keys, lib_vals=lib_vals,
                 ontology=np.array(["\x1f".join(t) for t in sorted(self.ontology)], dtype=str))


class SplitStats:
    """The reduction of many shards' statistics."""

    def __init__(self, n_genes: int):
        self.n_genes = n_genes
        self.n_cells = 0
        self.arrays = {k: np.zeros(n_genes) for k in ("sum_log", "sumsq_log", "sum_cp10k", "sumsq_cp10k", "nnz")}
        self.types: dict[str, list] = {}  # name -> [cells, sum_log, nnz]
        self.library: dict[tuple, np.ndarray] = {}
        self.ontology: set[tuple[str, ...]] = set()

    def add_file(self, path: str) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.n_cells += int(z["n_cells"])
            for k in self.arrays:
                self.arrays[k] += z[k]
            for name, cells, s, nz in zip(z["type_names"], z["type_cells"], z["type_sum_log"], z["type_nnz"]):
                acc = self.types.setdefault(str(name), [0, np.zeros(self.n_genes), np.zeros(self.n_genes)])
                acc[0] += int(cells)
                acc[1] += s
                acc[2] += nz
            for key, vals in zip(z["lib_keys"], z["lib_vals"]):
                k = tuple(str(key).split("\x1f"))
                self.library[k] = self.library.get(k, np.zeros(3)) + vals
            if "ontology" in z:  # statistics written before ontology term ids were kept have none
                self.ontology |= {tuple(str(t).split("\x1f")) for t in z["ontology"]}

    # ---------------------------------------------------------------- results
    def gene_stats(self) -> dict[str, np.ndarray]:
        n = max(self.n_cells, 1)
        a = self.arrays
        mean_log = a["sum_log"] / n
        mean_cp = a["sum_cp10k"] / n
        return {
            "mean_log1p_cp10k": mean_log,
            "var_log1p_cp10k": np.maximum(a["sumsq_log"] / n - mean_log**2, 0.0),
            "mean_cp10k": mean_cp,
            "var_cp10k": np.maximum(a["sumsq_cp10k"] / n - mean_cp**2, 0.0),
            "detection_rate": a["nnz"] / n,
        }

    def hvg_ranking(self, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Genes ranked by normalised dispersion, the 'seurat' flavour of scanpy's
        ``highly_variable_genes`` (Satija et al., 2015): dispersion var/mean of CP10k, log,
        z-scored within 20 bins of mean expression. Returns (order, normalised dispersion)."""
        s = self.gene_stats()
        mean, var = s["mean_cp10k"], s["var_cp10k"]
        expressed = mean > 0
        disp = np.full(self.n_genes, -np.inf)
        disp[expressed] = np.log(np.maximum(var[expressed], 1e-12) / mean[expressed])
        norm = np.full(self.n_genes, -np.inf)
        if expressed.any():
            logmean = np.log1p(mean[expressed])
            edges = np.linspace(logmean.min(), logmean.max() + 1e-9, n_bins + 1)
            bins = np.clip(np.digitize(logmean, edges) - 1, 0, n_bins - 1)
            d = disp[expressed]
            z = np.zeros_like(d)
            for b in np.unique(bins):
                m = bins == b
                sd = d[m].std()
                # a gene alone in its bin gets dispersion 1, as scanpy does
                z[m] = (d[m] - d[m].mean()) / sd if m.sum() > 1 and sd > 0 else 1.0
            norm[expressed] = z
        order = np.lexsort((np.arange(self.n_genes), -np.nan_to_num(norm, neginf=-1e9)))
        return order, norm

    def markers(self, gene_names: np.ndarray, n: int = 20, min_detection: float = 0.25) -> dict[str, list[dict]]:
        """Top ``n`` genes per cell type by log2 fold change of mean expression against all
        other cells, among genes detected in at least ``min_detection`` of the type's cells."""
        total_sum = self.arrays["sum_log"]
        out = {}
        for name, (cells, s, nz) in sorted(self.types.items()):
            rest = max(self.n_cells - cells, 1)
            mean_in = np.expm1(s / max(cells, 1))
            mean_out = np.expm1((total_sum - s) / rest)
            lfc = np.log2((mean_in + 1e-3) / (mean_out + 1e-3))
            ok = nz / max(cells, 1) >= min_detection
            idx = np.flatnonzero(ok)[np.argsort(-lfc[ok], kind="stable")][:n]
            out[name] = [{"feature_name": str(gene_names[i]), "log2fc": round(float(lfc[i]), 4),
                          "detection": round(float(nz[i] / max(cells, 1)), 4)} for i in idx]
        return out

    def library_sizes(self) -> list[dict]:
        """Log-normal fit of the library size per (cell_type, tissue_general, disease, assay)."""
        rows = []
        for key, (n, s, ss) in sorted(self.library.items()):
            mean = s / n
            sd = float(np.sqrt(max(ss / n - mean**2, 0.0)))
            rows.append({**dict(zip(LIBRARY_KEYS, key)), "n": int(n), "mean_log": round(float(mean), 5),
                         "sd_log": round(sd, 5)})
        return rows

    def condition_counts(self) -> dict[tuple[str, str, str], int]:
        """Cells per (cell_type, tissue_general, disease): the library groups summed over assays."""
        out: dict[tuple[str, str, str], int] = {}
        for key, (n, _, _) in self.library.items():
            k = tuple(key[: len(CONDITION_KEYS)])
            out[k] = out.get(k, 0) + int(n)
        return out

    def ontology_term_ids(self) -> dict[str, dict[str, str]]:
        """Field -> label -> its ontology term id (CL, UBERON, MONDO / PATO), where the source has
        the ``*_ontology_term_id`` columns."""
        out: dict[str, dict[str, str]] = {}
        for f, label, term in sorted(self.ontology):
            out.setdefault(f, {})[label] = term
        return out

    def cell_type_counts(self) -> dict[str, int]:
        return {k: int(v[0]) for k, v in sorted(self.types.items())}
