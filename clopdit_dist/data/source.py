"""Read cells from the CELLxGENE Census or a local Census-shaped collection through TileDB-SOMA.

A :class:`CellSource` is one query (organism + obs value filter + gene vocabulary). It never
reads the whole matrix: callers ask for the cells they want (``read_cells``), which comes
back as obs rows plus a CSR matrix over the query's gene vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma
from pandas.api.types import union_categoricals

from ..errors import FilterError, GeneVocabularyError, SourceError

# Runs of consecutive ids per X read. TileDB loads every tile a requested coordinate falls in,
# so one read of cells scattered over the whole array (the val_cells / test_cells shards: a few
# percent of every training study) held most of the array in memory at once: 2.9 GB for 4,000
# cells of a 600k-cell atlas, growing with the atlas. Reading at most this many runs at a time
# bounds the tiles in memory (0.45 GB there), while a train shard (16 blocks of consecutive ids)
# stays one read: chunking by cells instead cost train shards 26% more read time
# (benchmarks/shard_build_memory.py).
READ_CHUNK_RUNS = 256

# TileDB-SOMA's result buffer per column for the planner's obs reads ("soma.init_buffer_bytes";
# cellxgene_census sets 1 GiB). A read whose result fits comes back whole, and meanwhile TileDB's
# unordered reader holds the tiles of the whole query: the obs read of a 1M-cell atlas peaked ~245 MB
# above the interpreter, ~240 bytes per cell, ~15 GB at the Census's 60M cells. A row-major read with
# small buffers comes in batches that the streaming planner (plan.py) processes and drops: 4 MiB is
# ~65k rows of the synthetic atlas and ~100k of the Census (36-character dataset ids); 16 MiB, 4x the
# rows, planned a 3M-cell atlas ~5% faster and peaked 480 instead of 185 MB above the interpreter
# (benchmarks/planner_scale.py; docs/atlas_scale.md, "The streaming planner"). X reads keep the large buffers:
# they are bounded by a shard's cells, and many small batches left a shard build's peak higher.
OBS_READ_BUFFER_BYTES = 4 * 2**20

# Columns carried with every cell from the source into shards and batches.
CELL_COLUMNS = (
    "soma_joinid", "dataset_id", "cell_type", "cell_type_ontology_term_id", "tissue_general",
    "tissue_general_ontology_term_id", "tissue", "disease", "disease_ontology_term_id", "assay", "sex",
    "development_stage", "donor_id", "suspension_type", "self_reported_ethnicity", "is_primary_data",
)


@dataclass
class Query:
    """What to read: ``source`` is a local collection path or URI, or a Census version
    ("stable", "latest", "2025-01-30")."""

    source: str
    organism: str = "homo_sapiens"
    obs_filter: str | None = None
    genes: list[str] = field(default_factory=list)  # feature_id or feature_name; empty = all

    def to_dict(self) -> dict:
        return asdict(self)


def open_census(source: str, tiledb_config: dict | None = None) -> soma.Collection:
    """Open ``source`` the way the Census API does: a path/URI to a Census-shaped collection,
    or a published Census version (needs network)."""
    import cellxgene_census

    if "://" in source or os.path.exists(source):
        if "://" not in source and not os.path.exists(os.path.join(source, "census_data")):
            raise SourceError(
                f"{source} is not a Census-shaped collection (no census_data/ inside); "
                "create one with `clopdit data synth --out DIR` or `clopdit data ingest FILE.h5ad --out DIR`")
        return cellxgene_census.open_soma(uri=source, tiledb_config=tiledb_config)
    if os.sep in source or source.startswith("."):
        raise SourceError(f"{source} does not exist")
    return cellxgene_census.open_soma(census_version=source, tiledb_config=tiledb_config)


class CellSource:
    """An open query over one organism's experiment."""

    def __init__(self, query: Query, tiledb_config: dict | None = None):
        self.query = query
        self.census = open_census(query.source, tiledb_config)
        data = self.census["census_data"]
        if query.organism not in data:
            self.close()
            raise FilterError(f"organism {query.organism!r} is not in {query.source}; it has {sorted(data.keys())}")
        self.exp = data[query.organism]
        self.var = self._read_var()
        var_ids = self.var["soma_joinid"].to_numpy()
        self._var_col = np.full(int(var_ids.max()) + 1 if len(var_ids) else 0, -1, dtype=np.int64)
        self._var_col[var_ids] = np.arange(len(var_ids))
        self._X = self.exp.ms["RNA"].X["raw"]

    def _read_var(self) -> pd.DataFrame:
        var = self.exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat()
        var = var.to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        if self.query.genes:
            wanted = pd.Index(self.query.genes)
            hit = var["feature_id"].isin(wanted) | var["feature_name"].isin(wanted)
            found = set(var.loc[hit, "feature_id"]) | set(var.loc[hit, "feature_name"])
            missing = [g for g in wanted if g not in found]
            if missing:
                raise GeneVocabularyError(f"{len(missing)} requested genes are not in {self.query.source}: {missing[:20]}")
            var = var[hit].reset_index(drop=True)
        return var

    @property
    def obs_columns(self) -> list[str]:
        return list(self.exp.obs.schema.names)

    def obs_batches(self, columns=("soma_joinid", "dataset_id")) -> Iterator[pd.DataFrame]:
        """obs rows matching the filter, only ``columns``, in soma_joinid order, a batch of
        ~65-100k rows at a time (``OBS_READ_BUFFER_BYTES``); string columns as categoricals (one
        byte a label instead of an 8-byte pointer). The shard planner reads these twice and
        keeps none."""
        flt = self.query.obs_filter
        context = self.exp.context.replace(tiledb_config={"soma.init_buffer_bytes": OBS_READ_BUFFER_BYTES})
        try:
            with soma.DataFrame.open(self.exp.obs.uri, context=context) as obs:
                for table in obs.read(value_filter=flt or None, column_names=list(columns), result_order="row-major"):
                    yield _categorical_frame(table)
        except Exception as exc:  # tiledbsoma raises several types for a bad filter
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FilterError(
                f"obs filter {flt!r} could not be applied to {self.query.source} ({reason}). "
                f"Write it in TileDB-SOMA value_filter syntax, e.g. \"is_primary_data == True and "
                f"tissue_general == 'lung'\"; obs columns are: {', '.join(self.obs_columns)}") from exc

    def obs(self, columns=("soma_joinid", "dataset_id")) -> pd.DataFrame:
        """All of :meth:`obs_batches` in one frame, sorted by soma_joinid."""
        frames = list(self.obs_batches(columns))
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype="int64" if c == "soma_joinid" else "category") for c in columns})
        obs = pd.DataFrame({c: union_categoricals([f[c] for f in frames]) if isinstance(frames[0][c].dtype,
                            pd.CategoricalDtype) else np.concatenate([f[c].to_numpy() for f in frames])
                            for c in frames[0].columns})
        if not obs["soma_joinid"].is_monotonic_increasing:  # row-major is joinid order; another source may not be
            obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
        return obs

    def read_cells(self, joinids: np.ndarray, columns=CELL_COLUMNS) -> tuple[pd.DataFrame, sp.csr_matrix]:
        """obs rows and raw counts (CSR over ``self.var``) of ``joinids``, in the order given
        (ids may repeat)."""
        joinids = np.asarray(joinids, dtype=np.int64)
        unique_ids, inverse = np.unique(joinids, return_inverse=True)
        if len(unique_ids) == 0:
            return pd.DataFrame(columns=list(columns)), sp.csr_matrix((0, len(self.var)), dtype=np.float32)
        cols = [c for c in columns if c in self.obs_columns]
        obs = self.exp.obs.read(coords=(unique_ids,), column_names=cols).concat().to_pandas()
        obs = obs.set_index("soma_joinid").loc[unique_ids].reset_index()
        var_coords = None if not self.query.genes else self.var["soma_joinid"].to_numpy()
        run_starts = np.r_[0, np.flatnonzero(np.diff(unique_ids) != 1) + 1]
        bounds = np.r_[run_starts[::READ_CHUNK_RUNS], len(unique_ids)]
        table = pa.concat_tables(self._X.read(coords=(unique_ids[a:b], var_coords)).tables().concat()
                                 for a, b in zip(bounds[:-1], bounds[1:]))
        # a binary search, not a lookup table over the ids' range: a shard's blocks are spread over
        # the atlas, so a table took 8 bytes per atlas cell (~10 ms more per 4,096-cell shard here)
        rows = np.searchsorted(unique_ids, table["soma_dim_0"].to_numpy())
        gene_cols = self._var_col[table["soma_dim_1"].to_numpy()]
        X = sp.csr_matrix((table["soma_data"].to_numpy(), (rows, gene_cols)), shape=(len(unique_ids), len(self.var)))
        return obs.iloc[inverse].reset_index(drop=True), X[inverse]

    def close(self) -> None:
        self.census.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _categorical_frame(table: pa.Table) -> pd.DataFrame:
    """An obs batch with its string columns dictionary-encoded (pandas categoricals)."""
    cols = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.string()).dictionary_encode()
        cols[name] = col.to_pandas()
    return pd.DataFrame(cols)
