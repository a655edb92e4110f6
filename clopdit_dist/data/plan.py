"""The shard plan: the split of every cell, and the shard and block it is written to.

    obs batches ─ pass 1: cells per (study, condition) group ─ study splits, held-out cells drawn
                ─ pass 2: each cell's split from its rank in its group; ids spooled per split
                ─ blocks and shards ─ _build/plan.json + plan.joinids.npy

Two kinds of held-out cells, for two questions:

* ``val`` / ``test``: whole studies (``dataset_id``), never split, so these measure
  generalisation to new donors, labs and batches (and to condition combinations that no
  training study has);
* ``val_cells`` / ``test_cells``: a seeded ``heldout_cell_fraction`` of every *training*
  study's cells, stratified by (cell_type, tissue_general, disease) within the study, so
  these measure fit to the training distribution without a batch shift.

Every cell lands in exactly one split. Blocks are runs of consecutive cells of one split;
their order is permuted across the split so a shard mixes studies, and cells are permuted
within each block.

The plan is a pure function of the obs rows (in soma_joinid order) and the settings. It is made
in two streaming passes over obs, so the planner's memory does not grow with the atlas: it holds
one obs batch, one row per (study, condition) group, and the drawn held-out cells (9 bytes each:
two ``heldout_cell_fraction``s of the training cells); the ids go to disk, one local spool file
per split, and from there block by block into ``plan.joinids.npy``. Holding every cell's labels
instead cost ~0.1 kB a cell, ~6 GB for the Census's 60M (docs/atlas_scale.md, "Driver memory").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import FilterError, ShardError
from .manifest import CELL_SPLITS, CONDITION_KEYS, SPLITS, write_json_atomic

if TYPE_CHECKING:
    from .shards import ShardConfig

PLAN_IDS = "plan.joinids.npy"
PLAN_META = "plan.json"
_TRAIN = SPLITS.index("train")


# ---------------------------------------------------------------------- pass 1: groups
@dataclass
class CellGroups:
    """Cells per (dataset_id, *condition) group of the whole query. ``labels[g]`` are group g's
    labels (None where its cells have none), ``counts[g]`` its cells; ``keys`` the columns
    (dataset_id and those of ``CONDITION_KEYS`` that obs has)."""

    keys: list[str]
    labels: list[tuple] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    index: dict[tuple, int] = field(default_factory=dict)  # labels -> g

    @property
    def n_cells(self) -> int:
        return int(sum(self.counts))

    def study_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for lab, n in zip(self.labels, self.counts):
            if lab[0] is not None:
                sizes[lab[0]] = sizes.get(lab[0], 0) + n
        return sizes

    def of_batch(self, frame: pd.DataFrame, add: bool = False) -> np.ndarray:
        """The group of every cell of ``frame``; with ``add``, new groups are added and every
        cell counted."""
        labels, inverse = _batch_groups(frame, self.keys)
        if add:
            for lab, n in zip(labels, np.bincount(inverse, minlength=len(labels))):
                g = self.index.setdefault(lab, len(self.labels))
                if g == len(self.labels):
                    self.labels.append(lab)
                    self.counts.append(0)
                self.counts[g] += int(n)
        missing = [lab for lab in labels if lab not in self.index]
        if missing:
            raise ShardError(f"obs changed while the shard plan was made (group {missing[0]} appeared "
                             "between its two reads); rerun once the source is no longer being written")
        return np.array([self.index[lab] for lab in labels], np.int64)[inverse]


def count_groups(batches: Iterable[pd.DataFrame]) -> CellGroups:
    """Pass 1: cells per group over all ``batches`` (obs in soma_joinid order)."""
    groups, last = None, -1
    for frame in batches:
        if groups is None:
            groups = CellGroups(["dataset_id"] + [k for k in CONDITION_KEYS if k in frame])
        ids = frame["soma_joinid"].to_numpy()
        if len(ids) and (ids[0] <= last or (np.diff(ids) <= 0).any()):
            raise ShardError("the obs rows did not come in increasing soma_joinid order, which the shard "
                             "plan needs (a cell's split is drawn by its rank in its group)")
        last = ids[-1] if len(ids) else last
        groups.of_batch(frame, add=True)
    return groups if groups is not None else CellGroups(["dataset_id"])


def _batch_groups(frame: pd.DataFrame, keys: list[str]) -> tuple[list[tuple], np.ndarray]:
    """The distinct label tuples of a batch and each cell's index into them, from integer codes
    (mixed radix over the keys' codes, missing = 0): one batch's labels never become Python
    objects per cell."""
    combined, columns = np.zeros(len(frame), np.int64), []
    for k in keys:
        codes, values = _codes(frame[k])
        combined = combined * (len(values) + 1) + (codes.astype(np.int64) + 1)
        columns.append(values)
    uniq, inverse = np.unique(combined, return_inverse=True)
    digits = []
    for values in reversed(columns):
        digits.append(uniq % (len(values) + 1))
        uniq = uniq // (len(values) + 1)
    digits.reverse()
    labels = [tuple(None if d == 0 else values[d - 1] for d, values in zip(row, columns))
              for row in zip(*(d.tolist() for d in digits))] if len(frame) else []
    return labels, inverse.ravel()


def _codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a label column (-1 where missing) and the labels they stand for."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(), column.cat.categories.to_numpy()
    codes, labels = pd.factorize(column)
    return codes, np.asarray(labels)


# ---------------------------------------------------------------------- splits
def assign_splits(groups: CellGroups, cfg: ShardConfig) -> dict[str, str]:
    """Study -> split. Explicit lists win. Otherwise studies are taken in a seeded hash order
    into test, then val, until each holds its fraction of cells, skipping a study whose
    tissue(s), cell type(s) or disease(s) (those of these columns obs has) would then be
    left without a training study: held-out studies test new donors, labs, batches and
    combinations of known labels, not labels the model never saw."""
    sizes = groups.study_sizes()
    names = sorted(sizes)
    unknown = [s for s in cfg.val_studies + cfg.test_studies if s not in sizes]
    if unknown:
        raise FilterError(f"held-out studies {unknown} match no cell of the query; "
                          f"studies in the query: {names}")
    split = {s: "train" for s in names}
    if cfg.val_studies or cfg.test_studies:
        split.update({s: "val" for s in cfg.val_studies})
        split.update({s: "test" for s in cfg.test_studies})
        return split
    labels = {s: set() for s in names}  # study -> {(column, value)}
    for lab in groups.labels:
        if lab[0] is not None:
            labels[lab[0]].update((k, v) for k, v in zip(groups.keys[1:], lab[1:]) if v is not None)

    def keeps_labels_in_train(study: str) -> bool:
        others = set().union(*(labels[s] for s in names if split[s] == "train" and s != study))
        return labels[study] <= others

    order = sorted(names, key=lambda s: hashlib.sha256(f"{cfg.seed}/{s}".encode()).hexdigest())
    total = sum(sizes.values())
    for name, frac in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        taken = 0
        for s in order:
            if frac <= 0 or len(names) < 3 or sum(v == "train" for v in split.values()) <= 1:
                break
            if split[s] != "train" or not keeps_labels_in_train(s):
                continue
            if taken and taken + sizes[s] > frac * total * 1.5:
                continue
            split[s] = name
            taken += sizes[s]
            if taken >= frac * total:
                break
    return split


@dataclass
class CellSplit:
    """Which split each cell of each group is in: its study's, except for the held-out cells
    drawn from training groups, named by their key ``first[g] + rank`` (rank: the cell's place
    in its group in soma_joinid order)."""

    group_split: np.ndarray  # g -> code into SPLITS (-1: a cell of no study, in no split)
    first: np.ndarray  # g -> the key of its first cell
    held_keys: np.ndarray  # sorted keys of the held-out cells
    held_split: np.ndarray  # their codes into SPLITS
    per_group: np.ndarray  # (len(SPLITS), groups) cells

    @classmethod
    def draw(cls, groups: CellGroups, study_split: dict[str, str], cfg: ShardConfig) -> CellSplit:
        """Stratified: within a training study, every (cell_type, tissue_general, disease) group
        gives ``n · fraction`` cells to each of ``CELL_SPLITS``, rounded down or up at random with
        the remainder as the chance of rounding up, so a group of at least 1/fraction cells always
        gives one. Groups are visited in the order of their labels as text, so one seed gives one
        split; a cell with a missing label is in no group and stays in train."""
        f = cfg.heldout_cell_fraction
        if not 0 <= f <= 0.5:
            raise ShardError(f"heldout_cell_fraction={f}: choose a fraction in [0, 0.5] (0 turns cell-level "
                             "held-out splits off)")
        counts = np.asarray(groups.counts, np.int64)
        group_split = np.array([SPLITS.index(study_split[lab[0]]) if lab[0] in study_split else -1
                                for lab in groups.labels], np.int8)
        per_group = np.zeros((len(SPLITS), len(counts)), np.int64)
        known = np.flatnonzero(group_split >= 0)
        per_group[group_split[known], known] = counts[known]
        first = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        keys, codes = [np.zeros(0, np.int64)], [np.zeros(0, np.int8)]
        if f > 0:
            rng = np.random.default_rng([cfg.seed, 17])
            drawn = [g for g, lab in enumerate(groups.labels) if group_split[g] == _TRAIN and None not in lab]
            for g in sorted(drawn, key=lambda g: tuple(map(str, groups.labels[g]))):
                n = int(counts[g])
                take = [int(np.floor(n * f + rng.random())) for _ in CELL_SPLITS]
                ranks, start = rng.permutation(n), 0
                for name, k in zip(CELL_SPLITS, take):
                    k = min(k, n - start)
                    keys.append(first[g] + ranks[start:start + k])
                    codes.append(np.full(k, SPLITS.index(name), np.int8))
                    per_group[SPLITS.index(name), g] += k
                    per_group[_TRAIN, g] -= k
                    start += k
        keys, codes = np.concatenate(keys), np.concatenate(codes)
        order = np.argsort(keys)
        return cls(group_split, first, keys[order], codes[order], per_group)

    def of_cells(self, group: np.ndarray, rank: np.ndarray) -> np.ndarray:
        split = self.group_split[group]
        key = self.first[group] + rank
        pos = np.searchsorted(self.held_keys, key)
        hit = pos < len(self.held_keys)
        hit[hit] = self.held_keys[pos[hit]] == key[hit]
        split[hit] = self.held_split[pos[hit]]
        return split


def assign_cells(batches: Iterable[pd.DataFrame], groups: CellGroups,
                 cells: CellSplit) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Pass 2: each batch with the split code of each of its cells (a running rank per group
    carries over from batch to batch)."""
    seen = np.zeros(len(groups.counts), np.int64)
    for frame in batches:
        group = groups.of_batch(frame)
        order = np.argsort(group, kind="stable")
        g = group[order]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
        rank = np.empty(len(g), np.int64)
        rank[order] = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)])) + seen[g]
        seen += np.bincount(group, minlength=len(seen))
        yield frame, cells.of_cells(group, rank)


def split_cells(obs: pd.DataFrame, study_split: dict[str, str], cfg: ShardConfig,
                batch_rows: int | None = None) -> pd.Categorical:
    """The split of every cell of ``obs`` (sorted by soma_joinid), categories ``SPLITS``, one
    byte a cell; read as the planner reads it, in batches of ``batch_rows`` (all at once by default)."""
    step = batch_rows or max(len(obs), 1)
    batches = [obs.iloc[a:a + step] for a in range(0, len(obs), step)]
    groups = count_groups(batches)
    cells = CellSplit.draw(groups, study_split, cfg)
    codes = [c for _, c in assign_cells(batches, groups, cells)]
    return pd.Categorical.from_codes(np.concatenate(codes) if codes else np.zeros(0, np.int8), categories=SPLITS)


# ---------------------------------------------------------------------- plan
@dataclass
class Plan:
    key: dict
    splits: dict[str, str]  # study -> train / val / test
    shards: list[dict]  # name, split, n_cells, block_sizes
    joinids: np.ndarray | None  # all cells, shard after shard, block after block (None: not written)
    offsets: np.ndarray  # shard i owns joinids[offsets[i]:offsets[i+1]]
    cells_per_study: dict = field(default_factory=dict)  # split -> study -> cells

    def shard_joinids(self, i: int) -> np.ndarray:
        return self.joinids[self.offsets[i]:self.offsets[i + 1]]


def _block_order(n_cells: int, split_index: int, cfg: ShardConfig) -> tuple[np.random.Generator, np.ndarray]:
    """A split's blocks (runs of ``cells_per_block`` consecutive cells) in shard order, and the
    generator that then permutes the cells within each block, block after block."""
    rng = np.random.default_rng([cfg.seed, split_index])
    return rng, rng.permutation(-(-n_cells // cfg.cells_per_block))


def make_plan(groups: CellGroups, cfg: ShardConfig, read_obs: Callable[[], Iterable[pd.DataFrame]] | None = None,
              build_dir: str | None = None) -> Plan:
    """The plan from pass 1's groups. Its shards and counts need nothing else; with
    ``read_obs`` (obs batches again, as pass 1 read them) and ``build_dir``, pass 2 also writes
    the cell ids, and the plan is saved and returned with its ids memory-mapped."""
    splits = assign_splits(groups, cfg)
    cells = CellSplit.draw(groups, splits, cfg)
    per_split = cells.per_group.sum(axis=1)
    B = cfg.cells_per_block
    shards, offsets = [], [0]
    for si, split in enumerate(SPLITS):
        order = _block_order(int(per_split[si]), si, cfg)[1]
        sizes = np.minimum(B, per_split[si] - order * B)
        for k, a in enumerate(range(0, len(order), cfg.blocks_per_shard)):
            block_sizes = sizes[a:a + cfg.blocks_per_shard].tolist()
            shards.append({"name": f"{split}-{k:06d}.tar", "split": split, "n_cells": int(sum(block_sizes)),
                           "block_sizes": block_sizes})
            offsets.append(offsets[-1] + shards[-1]["n_cells"])
    studies = sorted(groups.study_sizes())
    cells_per_study = {}
    for si, split in enumerate(SPLITS):
        per_study = dict.fromkeys(studies, 0)
        for lab, n in zip(groups.labels, cells.per_group[si].tolist()):
            if lab[0] is not None:
                per_study[lab[0]] += n
        cells_per_study[split] = {s: n for s, n in per_study.items() if n}
    plan = Plan(cfg.plan_key(), splits, shards, None, np.array(offsets, np.int64), cells_per_study)
    if build_dir is None:
        return plan
    _write_joinids(read_obs(), groups, cells, per_split, cfg, build_dir)
    write_json_atomic(os.path.join(build_dir, PLAN_META), {"key": plan.key, "splits": plan.splits,
                                                           "shards": plan.shards, "offsets": offsets,
                                                           "cells_per_study": plan.cells_per_study})
    return load_plan(build_dir)


def _write_joinids(batches: Iterable[pd.DataFrame], groups: CellGroups, cells: CellSplit, per_split: np.ndarray,
                   cfg: ShardConfig, build_dir: str) -> None:
    """Pass 2: spool each split's ids (in soma_joinid order) to a local temporary file (``TMPDIR``;
    8 bytes a cell), then write them block by block in shard order into ``plan.joinids.npy``
    (atomically: nodes of one build may plan at once into one shared directory; none reads a
    half-written file)."""
    os.makedirs(build_dir, exist_ok=True)
    me = f"{os.getpid()}.{socket.gethostname()}"
    spool = tempfile.mkdtemp(prefix="clopdit-plan-")
    try:
        paths = [os.path.join(spool, f"{split}.ids") for split in SPLITS]
        files = [open(p, "wb") for p in paths]
        try:
            for frame, split in assign_cells(batches, groups, cells):
                ids = frame["soma_joinid"].to_numpy().astype(np.int64, copy=False)
                for si in np.unique(split[split >= 0]):
                    files[si].write(ids[split == si].tobytes())
        finally:
            for f in files:
                f.close()
        written = [os.path.getsize(p) // 8 for p in paths]
        if written != per_split.tolist():
            raise ShardError(f"obs changed while the shard plan was made ({sum(written)} cells on the second read, "
                             f"{int(per_split.sum())} on the first); rerun once the source is no longer being written")
        tmp = os.path.join(build_dir, f"plan.{me}.npy")
        B, itemsize = cfg.cells_per_block, np.dtype(np.int64).itemsize
        with open(tmp, "wb") as out:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)),
                                                       "fortran_order": False, "shape": (int(per_split.sum()),)})
            for si, path in enumerate(paths):
                rng, order = _block_order(int(per_split[si]), si, cfg)
                fd = os.open(path, os.O_RDONLY)
                try:
                    for a in range(0, len(order), cfg.blocks_per_shard):
                        shard = []
                        for b in order[a:a + cfg.blocks_per_shard].tolist():
                            size = min(B, int(per_split[si]) - b * B)
                            ids = np.frombuffer(os.pread(fd, size * itemsize, b * B * itemsize), np.int64)
                            shard.append(ids[rng.permutation(size)])
                        out.write(np.concatenate(shard).tobytes())
                finally:
                    os.close(fd)
        os.replace(tmp, os.path.join(build_dir, PLAN_IDS))
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def load_plan(build_dir: str) -> Plan | None:
    """The saved plan, its cell ids memory-mapped: a worker pages in its shards' ids, not the
    atlas's (8 bytes a cell, ~0.5 GB per worker at 60M cells)."""
    meta, ids, legacy = (os.path.join(build_dir, f) for f in (PLAN_META, PLAN_IDS, "plan.npz"))
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        m = json.load(f)
    if "offsets" in m and os.path.exists(ids):
        joinids, offsets = np.load(ids, mmap_mode="r"), np.asarray(m["offsets"], np.int64)
    elif os.path.exists(legacy):  # saved before the ids moved out of plan.npz
        with np.load(legacy, allow_pickle=False) as z:
            joinids, offsets = z["joinids"], z["offsets"]
    else:
        return None
    return Plan(m["key"], m["splits"], m["shards"], joinids, offsets, m.get("cells_per_study", {}))
