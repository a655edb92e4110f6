"""Build WebDataset shards from a SOMA query.

    SOMA query ─ plan (splits by study and cell, blocks, shards) ─ workers: read cells, write tar ─ manifest

The plan is a pure function of the query and the build settings and is saved first
(``_build/plan.json`` + ``plan.joinids.npy``), so a run killed at any point and started again with
the same arguments rebuilds only the shards that are missing, with exactly the same cells:
each soma_joinid lands in exactly one shard. A shard is complete when its tar has been
renamed into place and its ``_build/<name>.json`` written; anything else is rebuilt.

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
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import socket
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ..errors import FilterError, ShardError
from .blocks import BLOCK_EXT, encode_block
from .manifest import (
    CELL_SPLITS,
    CONDITION_KEYS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SPLITS,
    STUDY_SPLITS,
    sha256_file,
    write_json_atomic,
)
from .source import CELL_COLUMNS, CellSource, Query
from .stats import ShardStats, SplitStats

BUILD_DIR = "_build"
PLAN_IDS = "plan.joinids.npy"


@dataclass
class ShardConfig:
    source: str
    out: str
    organism: str = "homo_sapiens"
    obs_filter: str | None = None
    genes: list[str] = field(default_factory=list)
    cells_per_block: int = 256
    blocks_per_shard: int = 16
    val_studies: list[str] = field(default_factory=list)
    test_studies: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    heldout_cell_fraction: float = 0.03  # of each training study's cells, for val_cells and for test_cells
    seed: int = 0
    workers: int = 1
    n_markers: int = 20
    # several machines into one shared --out: node r of K builds shards r, r+K, r+2K, ... of the
    # same plan; the node that completes the set writes the manifest
    node_rank: int = 0
    num_nodes: int = 1

    def query(self) -> Query:
        return Query(self.source, self.organism, self.obs_filter, list(self.genes))

    def plan_key(self) -> dict:
        """Everything the plan depends on (not workers or nodes: any split of the work gives the same shards)."""
        d = asdict(self)
        for key in ("workers", "node_rank", "num_nodes"):
            d.pop(key)
        d.pop("out")
        d["source"] = os.path.abspath(self.source) if os.path.exists(self.source) else self.source
        return d


# ---------------------------------------------------------------------- splits
def assign_splits(obs: pd.DataFrame, cfg: ShardConfig) -> dict[str, str]:
    """Study -> split. Explicit lists win. Otherwise studies are taken in a seeded hash order
    into test, then val, until each holds its fraction of cells, skipping a study whose
    tissue(s), cell type(s) or disease(s) (those of these columns ``obs`` has) would then be
    left without a training study: held-out studies test new donors, labs, batches and
    combinations of known labels, not labels the model never saw."""
    sizes = obs["dataset_id"].value_counts()
    names = sorted(sizes.index)
    unknown = [s for s in cfg.val_studies + cfg.test_studies if s not in sizes.index]
    if unknown:
        raise FilterError(f"held-out studies {unknown} match no cell of the query; "
                         f"studies in the query: {names}")
    split = {s: "train" for s in names}
    if cfg.val_studies or cfg.test_studies:
        split.update({s: "val" for s in cfg.val_studies})
        split.update({s: "test" for s in cfg.test_studies})
        return split
    labels = {s: set() for s in names}  # study -> {(column, value)}
    study_codes, studies = _codes(obs["dataset_id"])
    for col in CONDITION_KEYS:
        if col in obs:
            codes, values = _codes(obs[col])
            known = (study_codes >= 0) & (codes >= 0)
            for pair in np.unique(study_codes[known].astype(np.int64) * len(values) + codes[known]):
                labels[studies[pair // len(values)]].add((col, values[pair % len(values)]))

    def keeps_labels_in_train(study: str) -> bool:
        others = set().union(*(labels[s] for s in names if split[s] == "train" and s != study))
        return labels[study] <= others

    order = sorted(names, key=lambda s: hashlib.sha256(f"{cfg.seed}/{s}".encode()).hexdigest())
    total = sizes.sum()
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


def split_cells(obs: pd.DataFrame, study_split: dict[str, str], cfg: ShardConfig) -> pd.Categorical:
    """The split of every cell of ``obs`` (in its row order; categories ``SPLITS``, one byte a
    cell): its study's split, except for a seeded ``heldout_cell_fraction`` of each training
    study's cells in ``val_cells`` and as many again in ``test_cells``.

    Stratified: within a study, every (cell_type, tissue_general, disease) condition gives
    ``n · fraction`` cells to each, rounded down or up at random with the remainder as the
    chance of rounding up, so a condition of at least 1/fraction cells always gives one.
    A pure function of ``obs`` (sorted by soma_joinid, as ``CellSource.obs`` returns it) and
    the settings. Works on integer codes, not labels: the planner holds every cell of the atlas."""
    f = cfg.heldout_cell_fraction
    if not 0 <= f <= 0.5:
        raise ShardError(f"heldout_cell_fraction={f}: choose a fraction in [0, 0.5] (0 turns cell-level "
                         "held-out splits off)")
    study_codes, studies = _codes(obs["dataset_id"])
    split_of_study = np.array([SPLITS.index(study_split[s]) if s in study_split else -1 for s in studies], np.int8)
    split = np.where(study_codes >= 0, split_of_study[study_codes], -1).astype(np.int8)
    if f > 0:
        _hold_out_cells(obs, split, f, cfg.seed)
    return pd.Categorical.from_codes(split, categories=SPLITS)


def _hold_out_cells(obs: pd.DataFrame, split: np.ndarray, fraction: float, seed: int) -> None:
    """Move each training (study, condition) group's share of cells to ``CELL_SPLITS`` in
    ``split`` (codes into ``SPLITS``). Groups are visited in the order of their labels as text
    and a group's cells in id order, so one seed gives one split; a cell with a missing label
    is in no group and stays in train."""
    keys = ["dataset_id"] + [k for k in CONDITION_KEYS if k in obs]
    train = np.flatnonzero(split == SPLITS.index("train"))
    group, labelled = np.zeros(len(train), np.int64), np.ones(len(train), bool)
    columns = []
    for k in keys:  # one integer per (study, condition): mixed-radix over the keys' codes
        codes, values = _codes(obs[k])
        codes = codes[train]
        labelled &= codes >= 0
        group = group * len(values) + np.maximum(codes, 0)
        columns.append((codes, values))
    train, group = train[labelled], group[labelled]
    columns = [(codes[labelled], values) for codes, values in columns]
    order = np.argsort(group, kind="stable")  # a group's cells stay in id order
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    bounds = np.r_[starts, len(order)]
    text = [tuple(str(values[codes[order[a]]]) for codes, values in columns) for a in starts]
    rng = np.random.default_rng([seed, 17])
    for g in sorted(range(len(starts)), key=text.__getitem__):
        rows = train[order[bounds[g]:bounds[g + 1]]]
        n = len(rows)
        take = [int(np.floor(n * fraction + rng.random())) for _ in CELL_SPLITS]
        perm = rng.permutation(rows)
        start = 0
        for name, k in zip(CELL_SPLITS, take):
            k = min(k, n - start)
            split[perm[start:start + k]] = SPLITS.index(name)
            start += k


def _codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a label column (-1 where missing) and the labels they stand for."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(), column.cat.categories.to_numpy()
    codes, labels = pd.factorize(column)
    return codes, np.asarray(labels)


# ---------------------------------------------------------------------- plan
@dataclass
class Plan:
    key: dict
    splits: dict[str, str]  # study -> train / val / test
    shards: list[dict]  # name, split, n_cells, block_sizes
    joinids: np.ndarray  # all cells, shard after shard, block after block
    offsets: np.ndarray  # shard i owns joinids[offsets[i]:offsets[i+1]]
    cells_per_study: dict = field(default_factory=dict)  # split -> study -> cells

    def shard_joinids(self, i: int) -> np.ndarray:
        return self.joinids[self.offsets[i]:self.offsets[i + 1]]


def make_plan(obs: pd.DataFrame, cfg: ShardConfig) -> Plan:
    splits = assign_splits(obs, cfg)
    split_of_cell = split_cells(obs, splits, cfg).codes
    study_codes, studies = _codes(obs["dataset_id"])
    known = (split_of_cell >= 0) & (study_codes >= 0)
    counts = np.bincount(split_of_cell[known].astype(np.int64) * len(studies) + study_codes[known],
                         minlength=len(SPLITS) * len(studies)).reshape(len(SPLITS), len(studies))
    by_name = sorted(range(len(studies)), key=lambda j: studies[j])
    cells_per_study = {k: {studies[j]: int(counts[i, j]) for j in by_name if counts[i, j]} for i, k in enumerate(SPLITS)}
    B = cfg.cells_per_block
    shards, parts, offsets = [], [], [0]
    for si, split in enumerate(SPLITS):
        ids = obs["soma_joinid"].to_numpy()[split_of_cell == si]
        if len(ids) == 0:
            continue
        rng = np.random.default_rng([cfg.seed, si])
        blocks = [ids[i:i + B] for i in range(0, len(ids), B)]
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        for k in range(0, len(blocks), cfg.blocks_per_shard):
            group = blocks[k:k + cfg.blocks_per_shard]
            group = [b[rng.permutation(len(b))] for b in group]
            name = f"{split}-{len([s for s in shards if s['split'] == split]):06d}.tar"
            shards.append({"name": name, "split": split, "n_cells": int(sum(map(len, group))),
                           "block_sizes": [len(b) for b in group]})
            parts.extend(group)
            offsets.append(offsets[-1] + shards[-1]["n_cells"])
    joinids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return Plan(cfg.plan_key(), splits, shards, joinids, np.array(offsets, np.int64), cells_per_study)


def save_plan(plan: Plan, build_dir: str) -> None:
    """Atomically (nodes of one build may save the same plan at once; none reads a half-written one)."""
    os.makedirs(build_dir, exist_ok=True)
    tmp = os.path.join(build_dir, f"plan.{os.getpid()}.{socket.gethostname()}.npy")
    np.save(tmp, plan.joinids)
    os.replace(tmp, os.path.join(build_dir, PLAN_IDS))
    write_json_atomic(os.path.join(build_dir, "plan.json"), {"key": plan.key, "splits": plan.splits,
                                                             "shards": plan.shards,
                                                             "offsets": plan.offsets.tolist(),
                                                             "cells_per_study": plan.cells_per_study})


def load_plan(build_dir: str) -> Plan | None:
    """The saved plan, its cell ids memory-mapped: a worker pages in its shards' ids, not the
    atlas's (8 bytes a cell, ~0.5 GB per worker at 60M cells)."""
    meta, ids, legacy = (os.path.join(build_dir, f) for f in ("plan.json", PLAN_IDS, "plan.npz"))
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


# ---------------------------------------------------------------------- workers
_SOURCE: CellSource | None = None
_PLAN: Plan | None = None


def _init_worker(query: Query, build_dir: str, threads: int) -> None:
    global _SOURCE, _PLAN
    config = {"sm.compute_concurrency_level": threads, "sm.io_concurrency_level": threads}
    _SOURCE = CellSource(query, tiledb_config=config)
    _PLAN = load_plan(build_dir)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "clopdit", "clopdit"
    return info


def build_shard(i: int, out: str, build_dir: str) -> dict:
    """Read shard ``i``'s cells, write its tar (atomically) and its statistics."""
    plan, src = _PLAN, _SOURCE
    meta = plan.shards[i]
    obs, X = src.read_cells(plan.shard_joinids(i), CELL_COLUMNS)
    obs["library_size"] = np.asarray(X.sum(axis=1)).ravel()
    stats = ShardStats(X.shape[1])
    stats.update(X, obs)
    stem = meta["name"][: -len(".tar")]
    final = os.path.join(out, meta["name"])
    tmp = final + ".partial"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            start = 0
            for b, size in enumerate(meta["block_sizes"]):
                payload = encode_block(X[start:start + size], obs.iloc[start:start + size])
                tar.addfile(_tarinfo(f"{stem}_{b:05d}.{BLOCK_EXT}", len(payload)), io.BytesIO(payload))
                start += size
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    stats.save(os.path.join(build_dir, f"{stem}.stats.npz"))
    done = {"name": meta["name"], "split": meta["split"], "n_cells": meta["n_cells"],
            "n_blocks": len(meta["block_sizes"]), "block_sizes": meta["block_sizes"], "bytes": os.path.getsize(final), "sha256": sha256_file(final)}
    write_json_atomic(os.path.join(build_dir, f"{stem}.json"), done)
    return done


def _build_shard_task(args) -> dict:
    return build_shard(*args)


def _pool_task(args) -> dict:
    """A pool worker's task: note which shard this process is building (so a death can be
    reported with the shard's name), then build it."""
    i, out, build_dir = args
    marker = os.path.join(build_dir, f"worker-{os.getpid()}.building")
    with open(marker, "w") as f:
        f.write(_PLAN.shards[i]["name"])
    done = build_shard(i, out, build_dir)
    os.remove(marker)
    return done


def _build_in_pool(tasks: list[tuple], workers: int, query: Query, build_dir: str, threads: int):
    """Build the shards in ``workers`` processes; yields each finished shard's record.

    A ``concurrent.futures`` pool, not ``multiprocessing.Pool``: when a worker dies (OOM
    killer, SIGKILL), ``multiprocessing.Pool`` starts a replacement and the dead worker's
    task never returns, so the build waited forever. Here the pool breaks, the other workers
    are stopped, and the error names the dead worker, how it died and the shard it was
    building; the shards finished before stay finished, and a rerun builds the rest."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(query, build_dir, threads))
    futures = [pool.submit(_pool_task, t) for t in tasks]
    procs = dict(pool._processes or {})  # pid -> process: which one died, and how
    try:
        for fut in as_completed(futures):
            try:
                done = fut.result()
            except BrokenProcessPool:
                procs.update(pool._processes or {})
                for p in procs.values():
                    p.join(timeout=5)
                # the first to die broke the pool; the others were then stopped with SIGTERM
                dead = [(pid, p.exitcode) for pid, p in procs.items() if p.exitcode not in (None, 0, -signal.SIGTERM)]
                dead = dead or [(pid, p.exitcode) for pid, p in procs.items() if p.exitcode not in (None, 0)]
                what = []
                for pid, code in dead:
                    marker = os.path.join(build_dir, f"worker-{pid}.building")
                    shard = open(marker).read().strip() if os.path.exists(marker) else None
                    what.append(f"worker (pid {pid}) died with {_exit_name(code)}"
                                + (f" while building {shard}" if shard else " between two shards"))
                raise ShardError(
                    f"shard build: {'; '.join(what) or 'a worker process died'}. The shards finished so far are "
                    f"kept in {os.path.dirname(build_dir)}: rerun the same command to build the rest") from None
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for f in os.listdir(build_dir):
            if f.startswith("worker-") and f.endswith(".building"):
                os.remove(os.path.join(build_dir, f))


def _exit_name(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _completed(out: str, build_dir: str, name: str) -> dict | None:
    stem = name[: -len(".tar")]
    marker = os.path.join(build_dir, f"{stem}.json")
    if not (os.path.exists(marker) and os.path.exists(os.path.join(out, name))
            and os.path.exists(os.path.join(build_dir, f"{stem}.stats.npz"))):
        return None
    with open(marker) as f:
        return json.load(f)


# ---------------------------------------------------------------------- driver
def build_shards(cfg: ShardConfig, dry_run: bool = False, progress: bool = True, log=print) -> dict | None:
    """Plan, build (or resume) this node's shards and, once every shard of the plan is built,
    write the manifest. Returns the manifest (None on a dry run, or while other nodes' shards
    are missing)."""
    from tqdm.auto import tqdm

    if not 0 <= cfg.node_rank < cfg.num_nodes:
        raise ShardError(f"node rank {cfg.node_rank} of {cfg.num_nodes} nodes: use --node-rank 0 .. "
                         f"{cfg.num_nodes - 1} (e.g. --node-rank $SLURM_NODEID --num-nodes $SLURM_NNODES)")
    build_dir = os.path.join(cfg.out, BUILD_DIR)
    with CellSource(cfg.query()) as src:
        obs = src.obs(("soma_joinid", "dataset_id") + tuple(k for k in CONDITION_KEYS if k in src.obs_columns))
        if obs.empty:
            raise FilterError(f"obs filter {cfg.obs_filter!r} matches no cell in {cfg.source} ({cfg.organism})")
        var = src.var
    plan, n_cells = make_plan(obs, cfg), len(obs)
    del obs  # the plan is all the build needs; the labels are ~12 bytes a cell
    if dry_run:
        log(json.dumps({"cells": n_cells, "genes": len(var), "studies": len(plan.splits),
                        "cells_per_split": {k: sum(plan.cells_per_study[k].values()) for k in SPLITS},
                        "studies_per_split": {k: sum(v == k for v in plan.splits.values()) for k in STUDY_SPLITS},
                        "shards": len(plan.shards), "cells_per_block": cfg.cells_per_block,
                        "blocks_per_shard": cfg.blocks_per_shard}, indent=1))
        return None

    existing = load_plan(build_dir)
    if existing is not None and existing.key != plan.key:
        diff = sorted(k for k in plan.key if existing.key.get(k) != plan.key[k])
        raise ShardError(f"{cfg.out} holds a shard build with other settings ({', '.join(diff)} differ); "
                         "use a new --out, or delete it to rebuild")
    if existing is None:
        save_plan(plan, build_dir)
    plan = load_plan(build_dir)  # its ids memory-mapped, not held
    mine = range(cfg.node_rank, len(plan.shards), cfg.num_nodes)
    todo = [i for i in mine if _completed(cfg.out, build_dir, plan.shards[i]["name"]) is None]
    pending = set(todo)
    done_cells = sum(plan.shards[i]["n_cells"] for i in mine if i not in pending)
    if done_cells:
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already built")

    workers = max(1, min(cfg.workers, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    t0 = time.perf_counter()
    my_cells = sum(plan.shards[i]["n_cells"] for i in mine)
    with tqdm(total=my_cells, initial=done_cells, unit="cell", desc="shards", disable=not progress,
              file=sys.stderr) as bar:
        tasks = [(i, cfg.out, build_dir) for i in todo]
        if workers == 1:
            _init_worker(cfg.query(), build_dir, threads)
            for t in tasks:
                bar.update(_build_shard_task(t)["n_cells"])
        else:
            for done in _build_in_pool(tasks, workers, cfg.query(), build_dir, threads):
                bar.update(done["n_cells"])
    elapsed = time.perf_counter() - t0
    built = sum(plan.shards[i]["n_cells"] for i in todo)
    records = [_completed(cfg.out, build_dir, s["name"]) for s in plan.shards]
    missing = sum(r is None for r in records)
    if missing:
        log(f"node {cfg.node_rank} of {cfg.num_nodes}: built its {len(mine)} shards ({built} cells in {elapsed:.1f}s); "
            f"{missing} shards of other nodes are not built yet. The node that finishes last writes "
            f"{MANIFEST_NAME}; or rerun this command once they are done.")
        return None
    manifest = write_manifest(cfg, plan, var, build_dir, records)
    log(f"wrote {len(plan.shards)} shards ({manifest['n_cells']}) to {cfg.out}; "
        f"built {built} cells in {elapsed:.1f}s")
    return manifest


def write_manifest(cfg: ShardConfig, plan: Plan, var: pd.DataFrame, build_dir: str, shards: list[dict]) -> dict:
    """``shards``: the record of every shard of the plan, in plan order (all built)."""
    stats = {split: SplitStats(len(var)) for split in SPLITS}
    for s in shards:
        stats[s["split"]].add_file(os.path.join(build_dir, s["name"][: -len(".tar")] + ".stats.npz"))
    train = stats["train"]
    gene_stats = {k: np.round(v, 6).tolist() for k, v in train.gene_stats().items()}
    order, norm = train.hvg_ranking()
    from .. import __version__

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"clopdit-dist {__version__}",
        "source": cfg.query().to_dict(),
        "build": {k: v for k, v in asdict(cfg).items() if k in ("cells_per_block", "blocks_per_shard", "seed",
                                                              "val_fraction", "test_fraction",
                                                              "heldout_cell_fraction")},
        "n_cells": {split: stats[split].n_cells for split in SPLITS},
        "splits": plan.splits,
        "held_out_cells": {"from_split": "train", "fraction": cfg.heldout_cell_fraction,
                           "stratified_by": ["dataset_id", *CONDITION_KEYS],
                           "n_cells": {split: stats[split].n_cells for split in CELL_SPLITS},
                           "n_cells_per_study": {split: plan.cells_per_study.get(split, {}) for split in CELL_SPLITS}},
        "conditions": conditions(stats),
        "vocabulary": {"feature_id": var["feature_id"].tolist(), "feature_name": var["feature_name"].tolist()},
        "shards": shards,
        "gene_stats": {"split": "train", **gene_stats},
        "hvg": {"flavor": "seurat", "split": "train", "ranking": order.tolist(),
                "normalized_dispersion": np.round(np.nan_to_num(norm, neginf=-1e9), 5).tolist()},
        "markers": train.markers(var["feature_name"].to_numpy(), n=cfg.n_markers),
        "cell_types": {split: stats[split].cell_type_counts() for split in SPLITS},
        "library_size": {"keys": ["cell_type", "tissue_general", "disease", "assay"],
                         "unit": "total raw counts over the vocabulary", "groups": train.library_sizes()},
    }
    write_json_atomic(os.path.join(cfg.out, MANIFEST_NAME), manifest)
    return manifest


def conditions(stats: dict[str, SplitStats]) -> dict:
    """Per split, every (cell_type, tissue_general, disease) with its cells and whether the train
    split has that exact combination (``in_train``), largest first: what an evaluator needs to
    list "held-out conditions with >= 30 cells" or "combinations no training study has"."""
    per_split = {split: s.condition_counts() for split, s in stats.items()}
    seen = set(per_split["train"])
    rows = {split: [{**dict(zip(CONDITION_KEYS, key)), "n_cells": n, "in_train": key in seen}
                    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            for split, counts in per_split.items()}
    return {"keys": list(CONDITION_KEYS), "splits": rows}
