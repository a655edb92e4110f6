"""Write a local collection in the layout of the CELLxGENE Census.

``cellxgene_census.open_soma(uri=ROOT)`` opens what this module writes::

    ROOT/                          SOMA Collection
      census_info/                 Collection: summary, datasets (DataFrames)
      census_data/<organism>/      Experiment
        obs                        DataFrame, Census obs schema (OBS_SCHEMA)
        ms/RNA/var                 DataFrame: feature_id, feature_name, feature_length
        ms/RNA/X/raw               SparseNDArray float32, cells x genes, raw counts

Both the synthetic atlas and ``clopdit data ingest`` go through :class:`CensusWriter`, so a
real h5ad appended to a synthetic atlas (or the reverse) shares one schema.
"""

from __future__ import annotations

import os
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

CENSUS_SCHEMA_VERSION = "2.1.0"

# One column tile spans every gene (Census has ~60k), so a row band of 2048 cells is one
# tile: row reads touch few tiles and row-major CSR chunks are written without a sort.
X_CREATE_OPTIONS = {"tiledb": {"create": {"dims": {"soma_dim_0": {"tile": 2048}, "soma_dim_1": {"tile": 1 << 17}},
                                          "cell_order": "row-major", "tile_order": "row-major"}}}

# Census obs columns (schema 2.x), in Census order. String columns are written as plain
# strings: the Census stores them dictionary-encoded, which readers see as categoricals.
OBS_STRING_COLUMNS = (
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id",
    "donor_id", "observation_joinid", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id",
    "sex", "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
    "tissue_general", "tissue_general_ontology_term_id",
)
OBS_SCHEMA = pa.schema(
    [("soma_joinid", pa.int64())]
    + [(c, pa.large_string()) for c in OBS_STRING_COLUMNS[:10]]
    + [("is_primary_data", pa.bool_())]
    + [(c, pa.large_string()) for c in OBS_STRING_COLUMNS[10:]]
    + [("raw_sum", pa.float64()), ("nnz", pa.int64()), ("raw_mean_nnz", pa.float64()),
       ("raw_variance_nnz", pa.float64()), ("n_measured_vars", pa.int64())]
)
VAR_SCHEMA = pa.schema([("soma_joinid", pa.int64()), ("feature_id", pa.large_string()),
                        ("feature_name", pa.large_string()), ("feature_length", pa.int64())])
DATASETS_SCHEMA = pa.schema([(c, pa.large_string()) for c in (
    "collection_id", "collection_name", "collection_doi", "dataset_id", "dataset_version_id",
    "dataset_title", "dataset_h5ad_path")] + [("dataset_total_cell_count", pa.int64())])
DATASETS_SCHEMA = pa.schema([("soma_joinid", pa.int64())] + list(DATASETS_SCHEMA))


def experiment_uri(root: str, organism: str) -> str:
    return os.path.join(root, "census_data", organism)


def count_stats(X: sp.csr_matrix) -> pd.DataFrame:
    """The per-cell QC columns the Census computes on raw counts."""
    nnz = np.diff(X.indptr).astype(np.int64)
    raw_sum = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    sq = np.asarray(X.multiply(X).sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_nnz = np.where(nnz > 0, raw_sum / np.maximum(nnz, 1), 0.0)
        var_nnz = np.where(nnz > 1, (sq - nnz * mean_nnz**2) / np.maximum(nnz - 1, 1), 0.0)
    return pd.DataFrame({"raw_sum": raw_sum, "nnz": nnz, "raw_mean_nnz": mean_nnz,
                         "raw_variance_nnz": var_nnz, "n_measured_vars": np.full(len(nnz), X.shape[1])})


class CensusWriter:
    """Create or append to a Census-shaped collection.

    Cells are appended in chunks (``append``) so an atlas of any size is written in bounded
    memory. Genes are identified by ``feature_id``; a chunk may carry genes the collection
    does not have yet, which are added to ``var`` (the X array grows to match).
    """

    def __init__(self, root: str, organism: str = "homo_sapiens", *, expected_cells: int = 0,
                 var: pd.DataFrame | None = None):
        self.root = root
        self.organism = organism
        self.exp_uri = experiment_uri(root, organism)
        if not os.path.exists(self.exp_uri):
            if var is None:
                raise ValueError(f"{self.exp_uri} does not exist and no gene table was given to create it")
            self._create(max(expected_cells, 1), var)
        self.obs_uri = os.path.join(self.exp_uri, "obs")
        self.var_uri = os.path.join(self.exp_uri, "ms", "RNA", "var")
        self.X_uri = os.path.join(self.exp_uri, "ms", "RNA", "X", "raw")
        with soma.Experiment.open(self.exp_uri) as exp:
            self.n_cells = _count_rows(exp.obs)
            var_df = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id"]).concat().to_pandas()
        self.feature_index = dict(zip(var_df["feature_id"], var_df["soma_joinid"]))
        self._datasets: list[dict] = []
        if var is not None:
            self.add_genes(var)

    # ------------------------------------------------------------------ layout
    def _create(self, n_cells: int, var: pd.DataFrame) -> None:
        root = self.root
        if not soma.Collection.exists(root):
            soma.Collection.create(root).close()
        with soma.Collection.open(root, "w") as coll:
            if "census_info" not in coll:
                info = coll.add_new_collection("census_info")
                info.add_new_dataframe("summary", schema=pa.schema([
                    ("soma_joinid", pa.int64()), ("label", pa.large_string()), ("value", pa.large_string())]),
                    domain=[(0, 63)]).close()
                info.add_new_dataframe("datasets", schema=DATASETS_SCHEMA, domain=[(0, 0)]).close()
            if "census_data" not in coll:
                coll.add_new_collection("census_data")
        data_uri = os.path.join(root, "census_data")
        soma.Experiment.create(self.exp_uri).close()
        with soma.Experiment.open(self.exp_uri, "w") as exp:
            exp.add_new_dataframe("obs", schema=OBS_SCHEMA, domain=[(0, n_cells - 1)]).close()
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection("RNA", soma.Measurement)
            rna.add_new_dataframe("var", schema=VAR_SCHEMA, domain=[(0, len(var) - 1)])
            rna.add_new_collection("X").add_new_sparse_ndarray(
                "raw", type=pa.float32(), shape=(n_cells, len(var)), platform_config=X_CREATE_OPTIONS).close()
        with soma.Collection.open(data_uri, "w") as data:
            data.set(self.organism, soma.Experiment.open(self.exp_uri), use_relative_uri=True)
        with soma.Experiment.open(self.exp_uri, "w") as exp:
            exp.ms["RNA"].var.write(pa.Table.from_pandas(_var_table(var, 0), schema=VAR_SCHEMA, preserve_index=False))

    def add_genes(self, var: pd.DataFrame) -> None:
        """Append genes of ``var`` whose feature_id the collection lacks."""
        new = var[~var["feature_id"].isin(self.feature_index)]
        if new.empty:
            return
        start = len(self.feature_index)
        table = _var_table(new, start)
        # Resize and write through separate handles: a handle keeps the domain it opened with.
        with soma.DataFrame.open(self.var_uri, "w") as v:
            v.tiledbsoma_resize_soma_joinid_shape(start + len(new))
        with soma.DataFrame.open(self.var_uri, "w") as v:
            v.write(pa.Table.from_pandas(table, schema=VAR_SCHEMA, preserve_index=False))
        with soma.SparseNDArray.open(self.X_uri, "w") as X:
            X.resize((X.shape[0], start + len(new)))
        self.feature_index.update(zip(table["feature_id"], table["soma_joinid"]))

    # ------------------------------------------------------------------ cells
    def append(self, obs: pd.DataFrame, X: sp.csr_matrix, feature_ids) -> np.ndarray:
        """Append cells. ``obs`` holds Census columns (missing ones are filled with
        "unknown"), ``X`` raw counts whose columns are ``feature_ids``. Returns the new
        soma_joinids."""
        if X.shape[0] != len(obs):
            raise ValueError(f"obs has {len(obs)} rows but X has {X.shape[0]}")
        missing = [f for f in feature_ids if f not in self.feature_index]
        if missing:
            raise ValueError(f"{len(missing)} genes are not in var of {self.exp_uri} (e.g. {missing[:5]}); "
                             "call add_genes first")
        n = len(obs)
        joinids = np.arange(self.n_cells, self.n_cells + n, dtype=np.int64)
        obs_df = _obs_table(obs, joinids, X)
        # Resize and write through separate handles: a handle keeps the domain it opened with.
        with soma.DataFrame.open(self.obs_uri, "w") as soma_obs:
            if soma_obs.domain[0][1] < joinids[-1]:
                soma_obs.tiledbsoma_resize_soma_joinid_shape(int(joinids[-1]) + 1)
        with soma.DataFrame.open(self.obs_uri, "w") as soma_obs:
            soma_obs.write(pa.Table.from_pandas(obs_df, schema=OBS_SCHEMA, preserve_index=False))
        with soma.SparseNDArray.open(self.X_uri, "w") as raw:
            if raw.shape[0] <= joinids[-1]:
                raw.resize((int(joinids[-1]) + 1, raw.shape[1]))
        coo = X.tocoo()
        col_map = np.array([self.feature_index[f] for f in feature_ids], dtype=np.int64)
        sorted_cols = bool(np.all(np.diff(col_map) > 0))
        table = pa.Table.from_pydict({"soma_dim_0": joinids[coo.row], "soma_dim_1": col_map[coo.col],
                                      "soma_data": coo.data.astype(np.float32)})
        # Rows of a CSR with increasing columns are already in the array's global order (one
        # column tile spans every gene), so TileDB need not sort them.
        presorted = sorted_cols and X.has_sorted_indices
        with soma.SparseNDArray.open(self.X_uri, "w") as raw:
            raw.write(table, platform_config={"tiledb": {"write": {"sort_coords": not presorted}}})
        self.n_cells += n
        return joinids

    def add_datasets(self, datasets: pd.DataFrame) -> None:
        """Rows for census_info/datasets (written on close)."""
        self._datasets.extend(datasets.to_dict("records"))

    def close(self) -> None:
        info_uri = os.path.join(self.root, "census_info")
        with soma.DataFrame.open(os.path.join(info_uri, "datasets")) as ds:
            start = _count_rows(ds)
        with soma.Collection.open(info_uri, "w") as info:
            if self._datasets:
                ds = info["datasets"]
                df = pd.DataFrame(self._datasets)
                for c in DATASETS_SCHEMA.names:
                    if c not in df:
                        df[c] = 0 if c == "dataset_total_cell_count" else ""
                df["soma_joinid"] = np.arange(start, start + len(df), dtype=np.int64)
                ds.tiledbsoma_resize_soma_joinid_shape(start + len(df))
                ds.write(pa.Table.from_pandas(df[DATASETS_SCHEMA.names], schema=DATASETS_SCHEMA, preserve_index=False))
            summary = pd.DataFrame({
                "soma_joinid": np.arange(4, dtype=np.int64),
                "label": ["census_schema_version", "census_build_date", "total_cell_count", "organism"],
                "value": [CENSUS_SCHEMA_VERSION, date.today().isoformat(), str(self.n_cells), self.organism]})
            info["summary"].write(pa.Table.from_pandas(summary, preserve_index=False))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _count_rows(df: soma.DataFrame) -> int:
    return sum(len(t) for t in df.read(column_names=["soma_joinid"]))


def _var_table(var: pd.DataFrame, start: int) -> pd.DataFrame:
    out = pd.DataFrame({
        "soma_joinid": np.arange(start, start + len(var), dtype=np.int64),
        "feature_id": var["feature_id"].astype(str).to_numpy(),
        "feature_name": var["feature_name"].astype(str).to_numpy(),
        "feature_length": (var["feature_length"].to_numpy(np.int64) if "feature_length" in var
                           else np.zeros(len(var), np.int64)),
    })
    return out


def _obs_table(obs: pd.DataFrame, joinids: np.ndarray, X: sp.csr_matrix) -> pd.DataFrame:
    df = pd.DataFrame({"soma_joinid": joinids})
    for col in OBS_STRING_COLUMNS:
        df[col] = obs[col].astype(str).to_numpy() if col in obs else "unknown"
    if "observation_joinid" not in obs:
        df["observation_joinid"] = [f"obs{j}" for j in joinids]
    df["is_primary_data"] = obs["is_primary_data"].astype(bool).to_numpy() if "is_primary_data" in obs else True
    for col, values in count_stats(X).items():
        df[col] = values.to_numpy()
    return df[OBS_SCHEMA.names]
