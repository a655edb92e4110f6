"""Put a real AnnData file (raw counts) into a Census-shaped collection.

    clopdit data ingest pbmc.h5ad --out atlas/ --map cell_type=louvain --map donor_id=patient

Counts come from ``--layer`` if given, else a ``counts`` layer, else ``raw.X``, else ``X``;
whichever is used must hold integers (raw counts), or the file is refused. obs columns
named like Census columns are kept; ``--map CENSUS=SOURCE`` renames others; missing
columns become "unknown". Genes are matched to the collection's ``var`` by feature_id
(or by feature_name with ``match_by="feature_name"``); new genes are added.
"""

from __future__ import annotations

import os
import uuid

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import IngestError
from .census_layout import OBS_STRING_COLUMNS, CensusWriter, experiment_uri


def _counts_matrix(adata: ad.AnnData, layer: str | None):
    if layer:
        if layer not in adata.layers:
            raise IngestError(f"layer {layer!r} is not in the file; layers: {list(adata.layers)}")
        return adata.layers[layer], f"layers[{layer!r}]", adata.var
    if "counts" in adata.layers:
        return adata.layers["counts"], "layers['counts']", adata.var
    if adata.raw is not None:
        return adata.raw.X, "raw.X", adata.raw.var
    return adata.X, "X", adata.var


def _check_integer(M, where: str, path: str) -> None:
    sample = M[: min(M.shape[0], 500)]
    values = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
    if values.size and not np.all(np.mod(values, 1) == 0):
        bad = values[np.mod(values, 1) != 0][0]
        raise IngestError(
            f"{where} of {path} holds non-integer values (e.g. {bad:.4g}), so it is not raw counts. "
            "clopdit needs raw counts: pass --layer NAME for a layer with counts, or ingest the file "
            "that has them (normalised or log data cannot be turned back into counts).")
    if values.size and values.min() < 0:
        raise IngestError(f"{where} of {path} holds negative values; raw counts are non-negative")


def _var_table(var: pd.DataFrame) -> pd.DataFrame:
    ids = next((var[c] for c in ("feature_id", "gene_ids", "gene_id", "ensembl_id") if c in var), None)
    names = next((var[c] for c in ("feature_name", "gene_symbols", "gene_symbol", "gene_name") if c in var), None)
    index = pd.Series(var.index.astype(str), index=var.index)
    return pd.DataFrame({"feature_id": (ids if ids is not None else index).astype(str).to_numpy(),
                         "feature_name": (names if names is not None else index).astype(str).to_numpy()})


def ingest_h5ad(path: str, out: str, organism: str = "homo_sapiens", mapping: dict[str, str] | None = None,
                layer: str | None = None, dataset_id: str | None = None, match_by: str = "feature_id",
                chunk_size: int = 10_000) -> int:
    """Append the cells of ``path`` to the collection at ``out`` (created if absent).
    Returns the number of cells written."""
    mapping = dict(mapping or {})
    if not os.path.isfile(path):
        raise IngestError(f"{path!r} is no file; give the path of an .h5ad of raw counts")
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError) as exc:  # not HDF5, or HDF5 without AnnData's groups
        raise IngestError(f"cannot read {path!r} as an AnnData .h5ad file ({str(exc).splitlines()[0][:120]}); give "
                          "an .h5ad of raw counts") from None
    M, where, var = _counts_matrix(adata, layer)
    _check_integer(M, where, path)
    genes = _var_table(var)
    unknown = [src for src in mapping.values() if src not in adata.obs]
    if unknown:
        raise IngestError(f"--map names obs columns {unknown} that {path} does not have; it has {list(adata.obs)}")
    bad_targets = [c for c in mapping if c not in OBS_STRING_COLUMNS and c != "is_primary_data"]
    if bad_targets:
        raise IngestError(f"--map targets {bad_targets} are not Census obs columns: {list(OBS_STRING_COLUMNS)}")

    obs = pd.DataFrame(index=adata.obs.index)
    for col in (*OBS_STRING_COLUMNS, "is_primary_data"):
        src = mapping.get(col, col)
        if src in adata.obs:
            obs[col] = adata.obs[src].astype(str).to_numpy() if col != "is_primary_data" else adata.obs[src]
    stem = os.path.splitext(os.path.basename(path))[0]
    if "dataset_id" not in obs:
        obs["dataset_id"] = dataset_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"clopdit-ingest/{stem}"))
    if "tissue_general" not in obs and "tissue" in obs:
        obs["tissue_general"] = obs["tissue"]
    obs["observation_joinid"] = adata.obs.index.astype(str).to_numpy()

    genes = _match(genes, out, organism, match_by)
    dup = genes["feature_id"][genes["feature_id"].duplicated()].unique()
    if len(dup):
        raise IngestError(f"{path}: {len(dup)} genes share a feature_id after matching by {match_by} "
                         f"(e.g. {list(dup[:5])}); make var unique first")
    with CensusWriter(out, organism, expected_cells=adata.n_obs, var=genes) as w:
        ids = genes["feature_id"].tolist()
        for start in range(0, adata.n_obs, chunk_size):
            X = sp.csr_matrix(M[start:start + chunk_size], dtype=np.float32)
            w.append(obs.iloc[start:start + chunk_size], X, ids)
        for ds_id, n in obs["dataset_id"].value_counts().items():
            w.add_datasets(pd.DataFrame([{"dataset_id": ds_id, "dataset_version_id": ds_id, "dataset_title": stem,
                                          "collection_name": f"ingested from {os.path.basename(path)}",
                                          "dataset_h5ad_path": os.path.abspath(path),
                                          "dataset_total_cell_count": int(n)}]))
    return adata.n_obs


def _match(genes: pd.DataFrame, out: str, organism: str, match_by: str) -> pd.DataFrame:
    """With ``match_by="feature_name"``, reuse the collection's feature_id for known symbols."""
    if match_by == "feature_id":
        return genes
    if match_by != "feature_name":
        raise IngestError(f"match_by={match_by!r}: use 'feature_id' or 'feature_name'")
    import tiledbsoma as soma

    if not os.path.exists(experiment_uri(out, organism)):
        return genes
    with soma.Experiment.open(experiment_uri(out, organism)) as exp:
        var = exp.ms["RNA"].var.read(column_names=["feature_id", "feature_name"]).concat().to_pandas()
    by_name = dict(zip(var["feature_name"], var["feature_id"]))
    out_genes = genes.copy()
    out_genes["feature_id"] = [by_name.get(n, i) for n, i in zip(genes["feature_name"], genes["feature_id"])]
    return out_genes
