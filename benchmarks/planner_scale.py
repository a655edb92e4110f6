"""The shard planner's memory and time up to the Census's size, measured rather than projected.

The planner is the one part of a shard build that reads the whole atlas (every cell's study and
condition, twice); workers read only their shards. Synthesizing counts for tens of millions of
cells takes hours here, but the planner never reads counts, so this writes *obs-only* atlases
(Census obs schema, labels only, an empty X) through the project's ``CensusWriter`` and plans
them exactly as ``clopdit data shards`` does (``count_groups`` then ``make_plan``, ids written),
each size in a fresh process, sampling its RSS every 10 ms.

Labels are Census-like in shape: studies of log-normal sizes (a median of ~15k cells), each with
1–2 tissues, 1–3 diseases and 10–40 cell types from a vocabulary of 600, drawn per cell, so the
number of (study, condition) groups grows with the atlas as it does in the Census.

    python benchmarks/planner_scale.py --sizes 1000000,10000000,60000000 --workdir /tmp/planner \\
        --out benchmarks/results/planner_scale_cpu2.jsonl

One JSON line per size: cells, groups, seconds per pass, peak RSS and peak above the
interpreter (MB), the plan's ids on disk; then one line with the fitted bytes per cell. The
planner before it streamed, for comparison (``pass1`` is its obs read, ``pass2`` its planning):

    PYTHONPATH=OLD_CHECKOUT python benchmarks/planner_scale.py --sizes ... --workdir /tmp/planner
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
from _measure import PeakRSS, emit

# appended, not prepended: an older checkout on PYTHONPATH must win (see the docstring)
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNK = 2_000_000


def write_obs_atlas(path: str, n_cells: int, seed: int = 0) -> None:
    """An obs-only Census-shaped atlas of ``n_cells`` cells (written once; reused if complete)."""
    import scipy.sparse as sp

    from clopdit_dist.data.census_layout import CensusWriter

    done = os.path.join(path, "complete.json")
    if os.path.exists(done):
        return
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n_cells:
        sizes.append(int(min(max(rng.lognormal(np.log(15_000), 1.2), 200), 2_000_000)))
    sizes[-1] -= sum(sizes) - n_cells
    types = np.array([f"cell type {i}" for i in range(600)], object)
    tissues = np.array([f"tissue {i}" for i in range(50)], object)
    diseases = np.array([f"disease {i}" for i in range(100)], object)
    var = pd.DataFrame({"feature_id": [f"ENSG{i:011d}" for i in range(8)], "feature_name": [f"G{i}" for i in range(8)]})
    t0 = time.perf_counter()
    with CensusWriter(path, expected_cells=n_cells, var=var) as writer:
        buffer: list[pd.DataFrame] = []
        for s, size in enumerate(sizes):
            ct = rng.choice(types, rng.integers(10, 41), replace=False)
            ts = rng.choice(tissues, rng.integers(1, 3), replace=False)
            ds = rng.choice(diseases, rng.integers(1, 4), replace=False)
            buffer.append(pd.DataFrame({"dataset_id": f"study-{s:05d}",
                                        "cell_type": ct[rng.zipf(1.6, size) % len(ct)],
                                        "tissue_general": rng.choice(ts, size), "disease": rng.choice(ds, size)}))
            while buffer and (sum(map(len, buffer)) >= CHUNK or s == len(sizes) - 1):
                frame = pd.concat(buffer, ignore_index=True)
                head, rest = frame.iloc[:CHUNK], frame.iloc[CHUNK:]
                head = head.assign(tissue=head["tissue_general"])
                writer.append(head, sp.csr_matrix((len(head), len(var)), dtype=np.float32), var["feature_id"])
                buffer = [rest.reset_index(drop=True)] if len(rest) else []
                print(f"  obs atlas {path}: {writer.n_cells:,} / {n_cells:,} cells "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    with open(done, "w") as f:
        json.dump({"cells": n_cells, "studies": len(sizes), "seconds": round(time.perf_counter() - t0, 1)}, f)


def plan_once(atlas: str, build_dir: str) -> dict:
    """Plan ``atlas`` as ``build_shards`` does, in this process; what each pass took. With an
    older checkout on PYTHONPATH (no ``data/plan.py``), its in-memory planner instead: the obs
    table read whole, then planned."""
    from clopdit_dist.data import shards as S
    from clopdit_dist.data.manifest import CONDITION_KEYS
    from clopdit_dist.data.source import CellSource

    cfg = S.ShardConfig(source=atlas, out=os.path.dirname(build_dir))
    with CellSource(cfg.query()) as src:
        columns = ("soma_joinid", "dataset_id") + tuple(k for k in CONDITION_KEYS if k in src.obs_columns)
        t0 = time.perf_counter()
        if hasattr(S, "count_groups"):
            groups = S.count_groups(src.obs_batches(columns))
            t1 = time.perf_counter()
            plan = S.make_plan(groups, cfg, lambda: src.obs_batches(columns), build_dir)
            planner, n_groups = "streaming", len(groups.counts)
        else:
            obs = src.obs(columns)
            t1 = time.perf_counter()
            plan = S.make_plan(obs, cfg)
            S.save_plan(plan, build_dir)
            planner, n_groups = "in_memory", None
        t2 = time.perf_counter()
    return {"planner": planner, "cells": int(plan.offsets[-1]), "groups": n_groups, "studies": len(plan.splits),
            "shards": len(plan.shards), "pass1_seconds": round(t1 - t0, 1), "pass2_seconds": round(t2 - t1, 1),
            "plan_ids_bytes": os.path.getsize(os.path.join(build_dir, "plan.joinids.npy"))}


def measure(atlas: str, build_dir: str) -> dict:
    """``plan_once`` in a fresh interpreter (so one size's allocations do not carry into the next);
    the base is its RSS once the library is imported."""
    shutil.rmtree(os.path.dirname(build_dir), ignore_errors=True)
    code = ("import json, os, sys, psutil; sys.path.insert(0, sys.argv[3]); import planner_scale as P; "
            "import clopdit_dist.data.shards, clopdit_dist.data.source; "
            "base = psutil.Process().memory_info().rss; print('BASE', base, flush=True); "
            "print(json.dumps(P.plan_once(sys.argv[1], sys.argv[2])), flush=True)")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", code, atlas, build_dir, here], stdout=subprocess.PIPE, text=True,
                            cwd=here)
    with PeakRSS([proc.pid], interval=0.01) as peak:
        base = int(proc.stdout.readline().split()[1])
        row = json.loads(proc.stdout.readline())
        proc.wait()
    if proc.returncode:
        raise SystemExit(f"planning {atlas} failed (exit {proc.returncode})")
    shutil.rmtree(os.path.dirname(build_dir), ignore_errors=True)
    return {**row, "base_rss_mb": base >> 20, "peak_rss_mb": peak.peak >> 20, "peak_over_base_mb": (peak.peak - base) >> 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated cell counts")
    p.add_argument("--workdir", required=True, help="where the obs-only atlases are kept (reused across runs)")
    p.add_argument("--out", default=None, help="append the JSON lines here")
    p.add_argument("--keep", action="store_true", help="keep the atlases (default: each removed after it is planned)")
    args = p.parse_args()
    results: list[dict] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        atlas = os.path.join(args.workdir, f"obs_{n}")
        write_obs_atlas(atlas, n)
        row = measure(atlas, os.path.join(args.workdir, "plan_out", "_build"))
        emit(args.out, results, bench="planner_scale", **row)
        if not args.keep:
            shutil.rmtree(atlas, ignore_errors=True)
    if len(results) >= 2:
        x = np.array([r["cells"] for r in results], float)
        y = np.array([r["peak_over_base_mb"] * 2**20 for r in results], float)
        slope, intercept = np.polyfit(x, y, 1)
        emit(args.out, results, bench="planner_scale", planner=results[0]["planner"], fit="peak_over_base_bytes_per_cell",
             bytes_per_cell=round(float(slope), 2), intercept_mb=round(float(intercept) / 2**20, 1),
             sizes=[r["cells"] for r in results])


if __name__ == "__main__":
    main()
