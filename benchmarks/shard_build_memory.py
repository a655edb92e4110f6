"""Where a shard build's memory goes: peak RSS per phase of one in-process build (one worker).

Samples this process's RSS every 5 ms and reports, per phase, the highest peak above the
interpreter's RSS before the build: the plan's two passes over obs (the driver's share, the part
that reads the whole atlas: ``plan_pass1_count`` counts cells per group, ``plan_pass2_write``
assigns and writes every cell's id; lines before the streaming planner have ``obs_read`` and
``make_plan`` instead), then ``read_cells`` and the whole shard, separately for train shards
(blocks of consecutive ids) and for held-out-cell shards (``val_cells`` / ``test_cells``:
ids scattered over the array, the case that held most of the array before reads were chunked,
see docs/atlas_scale.md), then the manifest. One JSON line per phase.

    clopdit data synth --out /tmp/atlas_600k --cells 600000 --genes 3000
    for chunk in 256 1000000000; do python benchmarks/shard_build_memory.py --atlas /tmp/atlas_600k \\
        --out-dir /tmp/shards_mem --read-chunk-runs $chunk --out benchmarks/results/shard_build_memory.jsonl; done
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import psutil
from _measure import PeakRSS, emit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", required=True, help="a Census-shaped atlas (clopdit data synth)")
    p.add_argument("--out-dir", required=True, help="where the shards go (deleted first)")
    p.add_argument("--out", default=None)
    p.add_argument("--read-chunk-runs", type=int, default=None,
                   help="override source.READ_CHUNK_RUNS (e.g. 1000000000: one read per shard, as before the fix)")
    p.add_argument("--plan-only", action="store_true",
                   help="stop after the plan (both passes, ids written): the driver's phases only, the ones "
                        "that read the whole atlas's obs; seconds at 3M cells instead of a quarter of an hour")
    args = p.parse_args()

    from clopdit_dist.data import shards as S
    from clopdit_dist.data import source

    if args.read_chunk_runs:
        source.READ_CHUNK_RUNS = args.read_chunk_runs
    proc = psutil.Process()
    peak = PeakRSS([os.getpid()], interval=0.005)
    phases: dict[str, dict] = {}
    current = {"shard": ""}

    def record(name: str, seconds: float) -> None:
        row = phases.setdefault(name, {"calls": 0, "peak_over_base_mb": 0, "seconds": 0.0})
        row["calls"] += 1
        row["seconds"] += seconds
        row["peak_over_base_mb"] = max(row["peak_over_base_mb"], (peak.peak - base) >> 20)

    def kind() -> str:
        return "heldout_cells" if current["shard"].split("-")[0] in ("val_cells", "test_cells") else "other_shards"

    def wrap(owner, fn, label):
        orig = getattr(owner, fn)

        def wrapped(*a, **k):
            if fn == "build_shard":
                current["shard"] = S._PLAN.shards[a[0]]["name"]
            peak.peak = proc.memory_info().rss  # this phase's peak starts from here
            t = time.perf_counter()
            out = orig(*a, **k)
            record(label() if callable(label) else label, time.perf_counter() - t)
            return out
        setattr(owner, fn, wrapped)

    wrap(S, "count_groups", "plan_pass1_count")  # reads obs once
    wrap(S, "make_plan", "plan_pass2_write")  # reads obs again, writes the plan's ids
    wrap(source.CellSource, "read_cells", lambda: f"read_cells/{kind()}")
    wrap(S, "build_shard", lambda: f"build_shard/{kind()}")
    wrap(S, "write_manifest", "write_manifest")
    shutil.rmtree(args.out_dir, ignore_errors=True)
    base = proc.memory_info().rss
    t0 = time.perf_counter()
    cfg = S.ShardConfig(source=args.atlas, out=args.out_dir, workers=1)
    with peak:
        if args.plan_only:  # the driver's planning, as build_shards does it
            with source.CellSource(cfg.query()) as src:
                columns = ("soma_joinid", "dataset_id") + tuple(k for k in S.CONDITION_KEYS if k in src.obs_columns)
                groups = S.count_groups(src.obs_batches(columns))
                S.make_plan(groups, cfg, lambda: src.obs_batches(columns), os.path.join(args.out_dir, S.BUILD_DIR))
            cells = groups.n_cells
        else:
            cells = sum(S.build_shards(cfg, progress=False, log=lambda *_: None)["n_cells"].values())
    results: list[dict] = []
    for name, row in phases.items():
        emit(args.out, results, bench="shard_build_memory", phase=name, cells=cells, plan_only=args.plan_only,
             read_chunk_runs=source.READ_CHUNK_RUNS, base_rss_mb=base >> 20, **row,
             seconds_total=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
