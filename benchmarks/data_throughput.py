"""Data pipeline throughput, one JSON line per result, all on one synthetic experiment and
the same HVGs, in one run:

  * tiledbsoma query read (``ExperimentAxisQuery.X("raw").tables()``), cells/s
  * shard build with 1 and 2 workers: cells/s, cells/s per worker, peak RSS of the process tree
  * our loader (batch 256) with 0, 1 and 2 DataLoader workers, cells/s; the exact stream
    (``exact=True``) with 0 and 2 beside it, as a ratio
  * tiledbsoma-ml ``ExperimentDataset`` (the Census team's loader), same batch, genes, workers
  * the ratio of our best configuration to tiledbsoma-ml's best

    python benchmarks/data_throughput.py --cells 100000 --out bench_out/data.jsonl
    python benchmarks/data_throughput.py --big 1000000    # also: peak RSS building a 1M-cell atlas

Runs in separate processes where memory or worker start-up is measured, so each number
belongs to its own case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _measure import PeakRSS
from _measure import emit as _emit

RESULTS: list[dict] = []


def emit(out, **row) -> None:
    _emit(out, RESULTS, **{"bench": "data_throughput", **row})


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run a command; wall seconds and peak RSS (bytes) of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRSS([proc.pid]) as rss:
        _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, rss.peak


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "clopdit_dist.cli", *args]


def bench_soma_read(atlas: str, hvg_ids: np.ndarray, out) -> None:
    import tiledbsoma as soma

    with soma.Experiment.open(os.path.join(atlas, "census_data", "homo_sapiens")) as exp:
        with exp.axis_query("RNA", var_query=soma.AxisQuery(coords=(hvg_ids,))) as q:
            t0 = time.perf_counter()
            n_obs = q.n_obs
            nnz = sum(len(t) for t in q.X("raw").tables())
            dt = time.perf_counter() - t0
    emit(out, case="tiledbsoma_query_read", cells=n_obs, genes=len(hvg_ids), nnz=nnz, seconds=round(dt, 3),
         cells_per_s=round(n_obs / dt))


def bench_loader(shards: str, workers: int, batches: int, out, exact: bool = False) -> float:
    """The resampled training stream, or the exact one (every cell once per epoch, blocks read
    by offset in a global order): the first ``batches`` batches."""
    from clopdit_dist.data.loader import CellLoader, LoaderConfig

    loader = CellLoader(shards, LoaderConfig(split="train", genes="hvg:2000", batch_size=256, num_workers=workers,
                                             batches_per_epoch=None if exact else batches, exact=exact))
    t0 = time.perf_counter()
    cells = 0
    for _, b in zip(range(batches), loader):
        cells += b["counts"].shape[0]
    dt = time.perf_counter() - t0
    rate = cells / dt
    emit(out, case="clopdit_loader", stream="exact" if exact else "resampled", num_workers=workers, batch_size=256,
         genes=2000, cells=cells, seconds=round(dt, 3), cells_per_s=round(rate))
    return rate


def bench_tiledbsoma_ml(atlas: str, hvg_ids: np.ndarray, workers: int, cells: int, out) -> float:
    import tiledbsoma as soma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    with soma.Experiment.open(os.path.join(atlas, "census_data", "homo_sapiens")) as exp:
        with exp.axis_query("RNA", var_query=soma.AxisQuery(coords=(hvg_ids,))) as q:
            ds = ExperimentDataset(q, layer_name="raw", obs_column_names=["soma_joinid", "cell_type"],
                                   batch_size=256, shuffle=True, seed=0)
            dl = experiment_dataloader(ds, num_workers=workers)
            t0 = time.perf_counter()
            n = 0
            for X, _obs in dl:
                n += X.shape[0]
                if n >= cells:
                    break
            dt = time.perf_counter() - t0
    rate = n / dt
    emit(out, case="tiledbsoma_ml_ExperimentDataset", num_workers=workers, batch_size=256, genes=len(hvg_ids),
         cells=n, seconds=round(dt, 3), cells_per_s=round(rate), shuffle=True)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=3_000)
    p.add_argument("--workdir", default=None, help="keep the atlas and shards here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--ml-cells", type=int, default=20_000, help="cells tiledbsoma-ml reads per configuration")
    p.add_argument("--big", type=int, default=0, help="also synthesize and shard an atlas of this many cells "
                                                       "and report peak RSS (e.g. 1000000)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="clopdit-bench-")
    atlas = os.path.join(work, "atlas")

    if not os.path.exists(os.path.join(atlas, "census_data")):
        dt, rss = run_measured(cli("data", "synth", "--out", atlas, "--cells", str(args.cells), "--genes",
                                   str(args.genes), "--workers", "2", "--no-progress"))
        emit(args.out, case="synthesize", cells=args.cells, genes=args.genes, workers=2, seconds=round(dt, 2),
             cells_per_s=round(args.cells / dt), peak_rss_mb=round(rss / 2**20))

    for workers in (1, 2):
        shards = os.path.join(work, f"shards_w{workers}")
        dt, rss = run_measured(cli("data", "shards", "--source", atlas, "--out", shards, "--workers", str(workers),
                                   "--no-progress"))
        emit(args.out, case="shard_build", workers=workers, cells=args.cells, seconds=round(dt, 2),
             cells_per_s=round(args.cells / dt), cells_per_s_per_worker=round(args.cells / dt / workers),
             peak_rss_mb=round(rss / 2**20), note="wall time includes process start, plan and manifest")

    from clopdit_dist.data.manifest import Manifest

    from clopdit_dist.data.source import CellSource, Query

    m = Manifest.load(os.path.join(work, "shards_w1"))
    with CellSource(Query(atlas)) as src:  # the same 2,000 HVGs, as SOMA var joinids
        joinid = dict(zip(src.var["feature_id"], src.var["soma_joinid"]))
    hvg = np.array([joinid[f] for f in m.feature_ids[m.hvg(2000)]], dtype=np.int64)
    bench_soma_read(atlas, hvg, args.out)
    batches = max(20, min(400, m.n_cells("train") // 256))
    ours = {w: bench_loader(os.path.join(work, "shards_w1"), w, batches, args.out) for w in (0, 1, 2)}
    exact = {w: bench_loader(os.path.join(work, "shards_w1"), w, batches, args.out, exact=True) for w in (0, 2)}
    for w, rate in exact.items():
        emit(args.out, case="exact_stream_vs_resampled", num_workers=w, ratio=round(rate / ours[w], 2))
    theirs = {w: bench_tiledbsoma_ml(atlas, hvg, w, args.ml_cells, args.out) for w in (0, 1, 2)}
    best_ours, best_theirs = max(ours.items(), key=lambda kv: kv[1]), max(theirs.items(), key=lambda kv: kv[1])
    emit(args.out, case="loader_speedup_vs_tiledbsoma_ml", ours_best_workers=best_ours[0],
         ours_cells_per_s=round(best_ours[1]), theirs_best_workers=best_theirs[0],
         theirs_cells_per_s=round(best_theirs[1]), ratio=round(best_ours[1] / best_theirs[1], 2), floor=10.0)

    if args.big:
        big_atlas, big_shards = os.path.join(work, "big_atlas"), os.path.join(work, "big_shards")
        if not os.path.exists(os.path.join(big_atlas, "census_data")):
            dt, rss = run_measured(cli("data", "synth", "--out", big_atlas, "--cells", str(args.big), "--genes",
                                       str(args.genes), "--workers", "2", "--no-progress"))
            emit(args.out, case="synthesize", cells=args.big, genes=args.genes, workers=2, seconds=round(dt, 1),
                 cells_per_s=round(args.big / dt), peak_rss_mb=round(rss / 2**20))
        dt, rss = run_measured(cli("data", "shards", "--source", big_atlas, "--out", big_shards, "--workers", "2",
                                   "--no-progress"))
        emit(args.out, case="shard_build", workers=2, cells=args.big, seconds=round(dt, 1),
             cells_per_s=round(args.big / dt), cells_per_s_per_worker=round(args.big / dt / 2),
             peak_rss_mb=round(rss / 2**20), rss_floor_mb=3072)


if __name__ == "__main__":
    main()
