"""Build WebDataset shards from a SOMA query.

    SOMA query ─ plan (splits by study and cell, blocks, shards: plan.py) ─ workers: read cells, write tar ─ manifest

The plan is a pure function of the query and the build settings and is saved first
(``_build/plan.json`` + ``plan.joinids.npy``), so a run killed at any point and started again with
the same arguments rebuilds only the shards that are missing, with exactly the same cells:
each soma_joinid lands in exactly one shard. A shard is complete when its tar has been
renamed into place and its ``_build/<name>.json`` written; anything else is rebuilt.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
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
from .plan import Plan, count_groups, load_plan, make_plan
from .source import CELL_COLUMNS, CellSource, Query
from .stats import ShardStats, SplitStats

BUILD_DIR = "_build"


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
    key, plan = cfg.plan_key(), None if dry_run else load_plan(build_dir)
    if plan is not None and plan.key != key:
        diff = sorted(k for k in key if plan.key.get(k) != key[k])
        raise ShardError(f"{cfg.out} holds a shard build with other settings ({', '.join(diff)} differ); "
                         "use a new --out, or delete it to rebuild")
    with CellSource(cfg.query()) as src:
        var = src.var
        if plan is None:  # a resumed build keeps its saved plan: no second look at obs
            columns = ("soma_joinid", "dataset_id") + tuple(k for k in CONDITION_KEYS if k in src.obs_columns)

            def read_obs(desc: str):
                # shown after 2 s: seconds up to 1M cells, minutes at the Census
                with tqdm(unit="cell", desc=desc, disable=not progress, file=sys.stderr, delay=2) as bar:
                    for frame in src.obs_batches(columns):
                        bar.update(len(frame))
                        yield frame

            groups = count_groups(read_obs("plan: counting"))
            if groups.n_cells == 0:
                raise FilterError(f"obs filter {cfg.obs_filter!r} matches no cell in {cfg.source} ({cfg.organism})")
            if dry_run:
                plan = make_plan(groups, cfg)
                log(json.dumps({"cells": groups.n_cells, "genes": len(var), "studies": len(plan.splits),
                                "cells_per_split": {k: sum(plan.cells_per_study[k].values()) for k in SPLITS},
                                "studies_per_split": {k: sum(v == k for v in plan.splits.values())
                                                      for k in STUDY_SPLITS},
                                "shards": len(plan.shards), "cells_per_block": cfg.cells_per_block,
                                "blocks_per_shard": cfg.blocks_per_shard}, indent=1))
                return None
            plan = make_plan(groups, cfg, lambda: read_obs("plan: assigning"), build_dir)  # ids memory-mapped
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
    list "held-out conditions with >= 30 cells" or "combinations no training study has"; and each
    label's ontology term id (``ontology_term_ids``), which prompts may name instead of the label."""
    per_split = {split: s.condition_counts() for split, s in stats.items()}
    seen = set(per_split["train"])
    rows = {split: [{**dict(zip(CONDITION_KEYS, key)), "n_cells": n, "in_train": key in seen}
                    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            for split, counts in per_split.items()}
    ids: dict[str, dict[str, str]] = {}
    for s in stats.values():
        for f, table in s.ontology_term_ids().items():
            ids.setdefault(f, {}).update(table)
    return {"keys": list(CONDITION_KEYS), "splits": rows, "ontology_term_ids": ids}
