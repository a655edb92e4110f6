"""manifest.json: what a shard directory holds and how it was made.

Fields (schema version 2): ``source`` (the query), ``build`` (block and shard sizes, seed,
held-out fractions), ``vocabulary`` (feature_id, feature_name), ``splits`` (study ->
train/val/test), ``held_out_cells`` (the cell-level held-out splits ``val_cells`` and
``test_cells`` drawn from training studies: fraction, stratification, cells per split and per
study), ``shards`` (name, split, n_cells, n_blocks, block_sizes, bytes, sha256), ``n_cells`` per split,
``conditions`` (per split: each cell_type, tissue_general, disease combination with its cells
and ``in_train``), ``gene_stats`` (train split: mean/var of log1p CP10k and CP10k, detection
rate), ``hvg`` (ranking, normalised dispersion), ``markers`` per cell type, ``cell_types``
(counts per split), ``library_size`` (log-normal fit per cell type, tissue, disease, assay).
Everything fitted (gene stats, HVGs, markers, library sizes) uses the ``train`` split only.

Version 1 had study-level splits only (no ``val_cells``/``test_cells``, no ``conditions``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import GeneVocabularyError, ShardError
from .blocks import block_n_cells, tar_block_offsets
from .stats import CONDITION_KEYS  # noqa: F401  (re-exported: the keys of ``conditions``)

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
STUDY_SPLITS = ("train", "val", "test")  # whole studies
CELL_SPLITS = ("val_cells", "test_cells")  # held-out cells of training studies
SPLITS = STUDY_SPLITS + CELL_SPLITS


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    """Readers see the old file or the new one; writers may race (the nodes of one shard build
    write the same plan and manifest), so each writes its own temporary file."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Manifest:
    """A loaded manifest plus the directory its shards live in."""

    data: dict
    root: str

    @classmethod
    def load(cls, path: str) -> "Manifest":
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        if not os.path.exists(path):
            raise ShardError(f"no shard manifest at {path}; build shards with "
                                    "`python launchers/build_shards.py --source ATLAS --out DIR`")
        with open(path) as f:
            data = json.load(f)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            why = (" (version 1 predates the held-out cells of training studies, val_cells/test_cells, "
                   "and the per-split conditions)" if version == 1 else "")
            raise ShardError(f"{path} has manifest schema version {version}; this clopdit-dist reads version "
                             f"{SCHEMA_VERSION}{why}. Rebuild the shards into a new directory with "
                             "`clopdit data shards --source ATLAS --out NEW_DIR`.")
        return cls(data, os.path.dirname(os.path.abspath(path)))

    @property
    def path(self) -> str:
        return os.path.join(self.root, MANIFEST_NAME)

    def sha256(self) -> str:
        return sha256_file(self.path)

    # ------------------------------------------------------------------ genes
    @cached_property
    def feature_ids(self) -> np.ndarray:
        return np.array(self.data["vocabulary"]["feature_id"])

    @cached_property
    def feature_names(self) -> np.ndarray:
        return np.array(self.data["vocabulary"]["feature_name"])

    @property
    def n_genes(self) -> int:
        return len(self.feature_ids)

    def hvg(self, k: int) -> np.ndarray:
        """Indices of the top ``k`` highly variable genes, in vocabulary order."""
        ranking = self.data["hvg"]["ranking"]
        if k > len(ranking):
            raise ShardError(f"asked for {k} HVGs but the vocabulary has {len(ranking)} genes")
        return np.sort(np.array(ranking[:k], dtype=np.int64))

    def gene_indices(self, genes) -> np.ndarray:
        """Vocabulary indices of ``genes``: "all", "hvg:K", or a list of feature_ids or
        feature_names (in the order given)."""
        if isinstance(genes, str):
            if genes == "all":
                return np.arange(self.n_genes)
            if genes.startswith("hvg:"):
                return self.hvg(int(genes.split(":", 1)[1]))
            raise ShardError(f"genes={genes!r}: use 'all', 'hvg:K' or a list of gene ids/names")
        lookup = {n: i for i, n in enumerate(self.feature_names)}
        lookup.update({f: i for i, f in enumerate(self.feature_ids)})
        missing = [g for g in genes if g not in lookup]
        if missing:
            raise GeneVocabularyError(f"{len(missing)} of {len(genes)} requested genes are not in the vocabulary of "
                           f"{self.path}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        return np.array([lookup[g] for g in genes], dtype=np.int64)

    # ------------------------------------------------------------------ shards
    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            hint = (f"; for several splits ask for each ({', '.join(repr(p) for p in split.split('+'))})"
                    if "+" in split else "")
            raise ShardError(f"split {split!r}: choose one of {SPLITS}{hint}")
        return [s for s in self.data["shards"] if s["split"] == split]

    def shard_paths(self, split: str) -> list[str]:
        return [os.path.join(self.root, s["name"]) for s in self.shards(split)]

    def block_cells(self, split: str) -> list[list[int]]:
        """Cells per block of each shard of a split (read from the block headers for shards
        built before the manifest recorded ``block_sizes``)."""
        out = []
        for s, path in zip(self.shards(split), self.shard_paths(split)):
            if "block_sizes" not in s:
                s["block_sizes"] = [block_n_cells(path, off) for off, _ in tar_block_offsets(path)]
            out.append(s["block_sizes"])
        return out

    def n_cells(self, split: str) -> int:
        return int(self.data["n_cells"][split])

    def studies(self, split: str) -> list[str]:
        """Studies with cells in ``split`` (for val_cells/test_cells: the training studies they come from)."""
        if split in CELL_SPLITS:
            return sorted(self.data["held_out_cells"]["n_cells_per_study"][split])
        return sorted(k for k, v in self.data["splits"].items() if v == split)

    def conditions(self, split: str, min_cells: int = 0, unseen_only: bool = False) -> list[dict]:
        """(cell_type, tissue_general, disease, n_cells, in_train) rows of ``split``, largest
        first; ``unseen_only``: combinations that the train split does not have."""
        self.shards(split)  # validates the name
        return [c for c in self.data["conditions"]["splits"][split]
                if c["n_cells"] >= min_cells and not (unseen_only and c["in_train"])]

    def ontology_term_ids(self) -> dict[str, dict[str, str]]:
        """Field -> label -> ontology term id (CL, UBERON, MONDO / PATO) of the source's labels;
        empty for shards built before they were kept."""
        return self.data["conditions"].get("ontology_term_ids", {})

    def verify(self) -> list[str]:
        """Names of shards whose file is missing or whose sha256 differs from the manifest."""
        bad = []
        for s in self.data["shards"]:
            p = os.path.join(self.root, s["name"])
            if not os.path.exists(p) or sha256_file(p) != s["sha256"]:
                bad.append(s["name"])
        return bad
