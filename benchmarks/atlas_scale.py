"""How the data pipeline and training scale with atlas size, one JSON line per result.

For each size in ``--sizes`` (cells):

  * synthesis of the Census-shaped atlas (``clopdit data synth`` -> ``write_synthetic_atlas``)
  * shard build with 1 and 2 workers (``clopdit data shards``)
  * loader read of the whole train split with 1 and 2 ranks (two processes, each a
    ``CellLoader(rank=r, world_size=2)``, ``resampled=False`` so every cell is read once;
    cells/s summed over ranks)
  * a training step's cells/s per stage with 1 and 2 ranks (``torch.distributed.run`` on
    ``tests/scripts/train_stages.py`` with the tests' small configs, a fixed number of steps,
    ``cells_per_s`` read from ``RUN/<stage>/log.jsonl``, the median after the warm-up steps):
    ae, clop and dit at the first size, ae at the others (its rate does not depend on the
    atlas size; measuring it again shows that)

Every case runs in its own process tree: wall seconds, peak RSS of the tree (sampled every
50 ms), shard bytes per cell and nnz per cell. At the end: a least-squares fit of seconds vs
cells per case (slope = seconds per cell, its inverse the asymptotic cells/s, and the
intercept = fixed cost) and the peak RSS per size per case.

    nice -n 19 python benchmarks/atlas_scale.py --sizes 100000,300000 \
        --out benchmarks/results/atlas_scale_cpu2.jsonl --workdir /tmp/atlas_scale
    nice -n 19 python benchmarks/atlas_scale.py --sizes 1000000 --workdir /tmp/atlas_scale \
        --out benchmarks/results/atlas_scale_cpu2.jsonl --fit-from benchmarks/results/atlas_scale_cpu2.jsonl
    # shard builds only, on atlases made beforehand as W/atlas_<cells> (e.g. clopdit data synth --out W/atlas_3000000 ...)
    python benchmarks/atlas_scale.py --sizes 100000,300000,1000000,3000000 --cases shard_build --workdir W \
        --out benchmarks/results/atlas_scale_memory_cpu2.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from _measure import PeakRSS
from _measure import emit as _emit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS: list[dict] = []
CASES = ("synthesize", "shard_build", "loader_read", "train_step")
RUN_ID = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())  # which invocation a line came from

SMALL = ["train.log_every=1", "train.ckpt_every=1000", "data.num_workers=0", "data.genes=hvg:200",
         "optim.warmup_steps=2", "train.wandb.mode=disabled", "data.eval_cells=300"]
AE_MODEL = ["model.hidden=[64,32]", "model.latent_tokens=4", "model.token_dim=8"]
CLOP_SMALL = ["model.embed_dim=16", "model.hidden=32", "model.captions_per_condition=4"]
DIT_SMALL = ["model.hidden_size=32", "model.token_dim=8", "model.depth=2", "model.num_heads=2",
             "eval_conditions=2", "eval_cells_per_condition=20", "stats_cells=500", "sampler.steps=4"]


def emit(out, **row) -> None:
    _emit(out, RESULTS, **{"bench": "atlas_scale", "run": RUN_ID, **row})


CPU = {"last": 0.0}  # CPU seconds (user + sys) of the last run_measured's process trees


def run_measured(cmds: list[list[str]], env=None) -> tuple[float, int, list[str]]:
    """Run commands side by side; wall seconds, peak RSS (bytes) of all their trees, stdouts.
    Also the CPU seconds of the trees (``CPU["last"]``; pool workers are waited for by their
    parents, so they count): on a shared machine it moves far less than wall time."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    with PeakRSS([p.pid for p in procs]) as rss:
        outs = [p.communicate() for p in procs]
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU["last"] = round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 2)
    for c, p, (o, e) in zip(cmds, procs, outs):
        if p.returncode:
            raise RuntimeError(f"{' '.join(c)} failed ({p.returncode}):\n{o[-2000:]}\n{e[-4000:]}")
    return dt, rss.peak, [o for o, _ in outs]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "clopdit_dist.cli", *args]


READ = """
import json, sys, time
from clopdit_dist.data.loader import CellLoader, LoaderConfig
shards, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
loader = CellLoader(shards, LoaderConfig(split="train", genes="hvg:2000", batch_size=256, num_workers=0,
                                         resampled=False), rank=rank, world_size=world)
t0 = time.perf_counter()
cells = sum(b["counts"].shape[0] for b in loader)
print(json.dumps({"rank": rank, "cells": cells, "seconds": time.perf_counter() - t0}))
"""


def atlas_nnz(atlas: str) -> int:
    import tiledbsoma as soma

    with soma.Experiment.open(os.path.join(atlas, "census_data", "homo_sapiens")) as exp:
        return int(exp.ms["RNA"].X["raw"].nnz)


def stage_configs(cfgdir: str, text_model: str, steps: int, batch: int) -> None:
    from omegaconf import OmegaConf

    common = [*SMALL, f"train.steps={steps}", f"data.batch_size={batch}", "train.precision=fp32",
              "train.zero_stage=1"]
    for stage, own in (("ae", AE_MODEL), ("clop", [f"model.text_model={text_model}", *CLOP_SMALL]),
                       ("dit", DIT_SMALL)):
        OmegaConf.save(OmegaConf.from_dotlist([*common, *own]), os.path.join(cfgdir, f"{stage}.yaml"))


def bench_size(n: int, args, work: str, text_model: str, stages: list[str]) -> None:
    out = args.out
    atlas = os.path.join(work, f"atlas_{n}")
    if "synthesize" in args.cases:
        dt, rss, _ = run_measured([cli("data", "synth", "--out", atlas, "--cells", str(n), "--genes",
                                       str(args.genes), "--workers", "2", "--no-progress")])
        nnz = atlas_nnz(atlas)
        emit(out, case="synthesize", cells=n, genes=args.genes, workers=2, seconds=round(dt, 2),
             cpu_seconds=CPU["last"], cells_per_s=round(n / dt), peak_rss_mb=round(rss / 2**20), nnz=nnz,
             nnz_per_cell=round(nnz / n, 1), atlas_bytes_per_cell=round(dir_bytes(atlas) / n, 1))
    elif os.path.isdir(atlas):
        nnz = atlas_nnz(atlas)
    else:
        sys.exit(f"{atlas} does not exist: add synthesize to --cases, or make it with "
                 f"`clopdit data synth --out {atlas} --cells {n} --genes {args.genes}`")

    from clopdit_dist.data.manifest import Manifest

    for workers in (1, 2) if "shard_build" in args.cases else ():
        shards = os.path.join(work, f"shards_{n}_w{workers}")
        dt, rss, _ = run_measured([cli("data", "shards", "--source", atlas, "--out", shards, "--workers",
                                       str(workers), "--no-progress")])
        m = Manifest.load(shards)
        nbytes = sum(s["bytes"] for s in m.data["shards"])
        emit(out, case="shard_build", cells=n, workers=workers, seconds=round(dt, 2), cpu_seconds=CPU["last"],
             cells_per_s=round(n / dt), cells_per_cpu_s=round(n / CPU["last"]),
             peak_rss_mb=round(rss / 2**20), shard_bytes=nbytes, shard_bytes_per_cell=round(nbytes / n, 1),
             nnz_per_cell=round(nnz / n, 1), shard_bytes_per_nnz=round(nbytes / nnz, 2), n_shards=len(m.data["shards"]),
             note="wall time includes process start, plan and manifest")
    shards = os.path.join(work, f"shards_{n}_w1")
    m = Manifest.load(shards)
    if "shard_build" in args.cases:
        other = Manifest.load(os.path.join(work, f"shards_{n}_w2"))
        same = [s["sha256"] for s in m.data["shards"]] == [s["sha256"] for s in other.data["shards"]]
        if not same:
            print(f"WARNING: shards of 1 and 2 workers differ at {n} cells", file=sys.stderr)
        if not args.keep:
            import shutil

            shutil.rmtree(os.path.join(work, f"shards_{n}_w2"), ignore_errors=True)

    for world in (1, 2) if "loader_read" in args.cases else ():
        dt, rss, outs = run_measured([[sys.executable, "-c", READ, shards, str(r), str(world)] for r in range(world)])
        per = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        cells = sum(p["cells"] for p in per)
        emit(out, case="loader_read", cells=n, split_cells=m.n_cells("train"), ranks=world, genes=2000,
             batch_size=256, cells_read=cells, seconds=round(dt, 2),
             cells_per_s_summed=round(sum(p["cells"] / p["seconds"] for p in per)),
             cells_per_s_wall=round(cells / dt), cpu_seconds=CPU["last"], loop_seconds=round(max(p["seconds"] for p in per), 3),
             peak_rss_mb=round(rss / 2**20),
             note="cells_per_s_summed: each rank's cells over its own loop time, summed; loop_seconds: the slowest "
                  "rank's loop; seconds (wall) includes process start-up")

    for world in (1, 2) if "train_step" in args.cases else ():
        run = os.path.join(work, f"run_{n}_r{world}")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), os.path.join(REPO, "tests", "scripts", "train_stages.py"), shards, run,
               ",".join(stages), f"--config-dir={args.cfgdir}"]
        dt, rss, _ = run_measured([cmd], env=env)
        for stage in stages:
            with open(os.path.join(run, stage, "log.jsonl")) as f:
                rows = [json.loads(line) for line in f if '"cells_per_s"' in line]
            rates = [r["cells_per_s"] for r in rows[args.warmup:]]
            emit(out, case="train_step", stage=stage, cells=n, ranks=world, steps=len(rows),
                 batch_size_per_rank=args.batch, cells_per_s=round(statistics.median(rates), 1),
                 step_time_s=round(statistics.median(r["step_time_s"] for r in rows[args.warmup:]), 4),
                 config="tests' small configs, fp32, ZeRO-1, gloo", warmup_steps_dropped=args.warmup)
        emit(out, case="train_launch", cells=n, ranks=world, stages=",".join(stages), seconds=round(dt, 1),
             peak_rss_mb=round(rss / 2**20), note="whole torchrun: engine starts, steps, end-of-stage evaluation")
    if not args.keep:  # ~6 kB a cell: 17 GB at 3M cells
        import shutil

        shutil.rmtree(shards, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:  # other jobs on the machine hold fixed ports
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def fit(out) -> None:
    """Least squares of seconds vs cells per case; peak RSS per size."""
    groups: dict[tuple, list[dict]] = {}
    for r in RESULTS:
        if r["case"] in ("synthesize", "shard_build", "loader_read"):
            key = (r["case"], r.get("workers"), r.get("ranks"))
            groups.setdefault(key, []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: r["cells"])  # the newest line per size (--fit-from may repeat one)
        rows[:] = list({r["cells"]: r for r in rows}.values())
    for (case, workers, ranks), rows in groups.items():
        x = np.array([r["cells"] if case != "loader_read" else r["split_cells"] for r in rows], float)
        y = np.array([r.get("loop_seconds", r["seconds"]) for r in rows], float)  # loader: the read loop
        row = {"case": "fit", "of": case, "workers": workers, "ranks": ranks, "sizes": [r["cells"] for r in rows],
               "seconds": y.tolist(), "peak_rss_mb": [r["peak_rss_mb"] for r in rows]}
        if all("cpu_seconds" in r for r in rows) and len(rows) >= 2:
            c = np.array([r["cpu_seconds"] for r in rows], float)
            cs, ci = np.polyfit(x, c, 1)
            row.update(cpu_seconds=c.tolist(), cpu_seconds_per_million_cells=round(cs * 1e6, 2),
                       cpu_intercept_s=round(ci, 2))
        if len(rows) >= 2:
            slope, intercept = np.polyfit(x, y, 1)
            row.update(seconds_per_million_cells=round(slope * 1e6, 2), intercept_s=round(intercept, 2),
                       asymptotic_cells_per_s=round(1 / slope) if slope > 0 else None,
                       rss_ratio_last_first=round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 2),
                       peak_rss_mb_per_million_cells=round(
                           np.polyfit(x, [r["peak_rss_mb"] for r in rows], 1)[0] * 1e6, 1),
                       cells_ratio_last_first=round(x[-1] / x[0], 2))
        emit(out, **{k: v for k, v in row.items() if v is not None})


CENSUS_CELLS = 60_000_000  # human Census, primary cells (approximately)


def project(path: str, cores_per_node: int = 32, gpus_per_node: int = 8, dit_cells_per_s_gpu: float = 20_000,
            sizes_from: int = 300_000) -> str:
    """Markdown tables: time and storage to shard the human Census on K nodes, and one DiT
    epoch, from the measured rates in ``path`` (this run's lines of at least ``sizes_from``
    cells). Assumptions are arguments and are printed with the tables."""
    rows = [json.loads(line) for line in open(path)]
    builds = [r for r in rows if r["case"] == "shard_build" and r["workers"] == 2 and r["cells"] >= sizes_from]
    fixed = statistics.median(r["shard_bytes_per_cell"] - 6 * r["nnz_per_cell"] for r in builds)
    timed = [r for r in builds if "cpu_seconds" in r]
    if timed:  # CPU seconds of the whole process tree (driver included): what a dedicated core does
        best = timed[-1]
        per_core_nnz = best["cells"] * best["nnz_per_cell"] / best["cpu_seconds"]
        basis = (f"{best['cells']:,} cells in {best['cpu_seconds']} CPU-seconds ({best['seconds']} s wall) at "
                 f"{best['nnz_per_cell']} nnz/cell, run {best['run']}")
    else:  # the machine is shared: the least-contended wall-clock build, 2 workers on 2 cores
        best = max(builds, key=lambda r: r["cells_per_s"])
        per_core_nnz = best["cells_per_s"] * best["nnz_per_cell"] / 2
        basis = f"{best['cells_per_s']:,} cells/s wall on 2 cores, run {best.get('run', 'first')}"
    out = [f"Basis: the two-worker build of {basis}: {per_core_nnz / 1e6:.2f} M nnz/s per core; "
           f"shard bytes per cell = 6 x nnz + {fixed:.0f}.", "",
           f"| nnz per cell | GB per 1M cells | human Census, {CENSUS_CELLS / 1e6:.0f}M cells | "
           + " | ".join(f"build time, K={k} ({k * cores_per_node} cores)" for k in (1, 8, 32))
           + " | write rate needed at K=32 |",
           "|---|---|---|" + "---|" * 4]
    for nnz in (938, 2000, 3500, 5000):
        per_cell = 6 * nnz + fixed
        secs = CENSUS_CELLS * nnz / per_core_nnz
        cells = " | ".join(_hours(secs / (k * cores_per_node)) for k in (1, 8, 32))
        bw = per_cell * CENSUS_CELLS / (secs / (32 * cores_per_node)) / 1e9
        out.append(f"| {nnz:,}{' (synthetic, measured)' if nnz == 938 else ''} | {per_cell * 1e6 / 1e9:.1f} | "
                   f"{per_cell * CENSUS_CELLS / 1e12:.2f} TB | {cells} | {bw:.0f} GB/s |")
    out += ["", f"| K nodes | GPUs | assumed cells/s per GPU | one DiT epoch of {CENSUS_CELLS / 1e6:.0f}M cells |",
            "|---|---|---|---|"]
    for k in (1, 8, 32):
        for rate in (5_000, dit_cells_per_s_gpu, 50_000):
            g = k * gpus_per_node
            out.append(f"| {k} | {g} | {rate:,.0f} | {_hours(CENSUS_CELLS / (rate * g))} |")
    return "\n".join(out)


def _hours(secs: float) -> str:
    if secs >= 3600:
        return f"{secs / 3600:.1f} h"
    return f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000")
    p.add_argument("--genes", type=int, default=3_000)
    p.add_argument("--steps", type=int, default=12, help="training steps per stage")
    p.add_argument("--warmup", type=int, default=3, help="first logged steps left out of the median")
    p.add_argument("--batch", type=int, default=64, help="training micro-batch per rank")
    p.add_argument("--workdir", default=None, help="atlases, shards and runs go here (default: a temp dir)")
    p.add_argument("--cases", default=",".join(CASES),
                   help="which of synthesize, shard_build, loader_read, train_step to run; without synthesize "
                        "the atlases WORKDIR/atlas_<cells> must exist (they are then kept)")
    p.add_argument("--keep", action="store_true", help="keep the shards and the atlases")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--fit-from", default=None, help="also fit over the newest run's size results already in this "
                                                    "JSONL file (e.g. 100k and 300k before a 1M run); with "
                                                    "--sizes '' only fit")
    p.add_argument("--project", default=None, metavar="JSONL",
                   help="print the Census projection tables (docs/atlas_scale.md) from these results and exit")
    args = p.parse_args()
    if args.project:
        print(project(args.project))
        return
    if args.fit_from and os.path.exists(args.fit_from):
        with open(args.fit_from) as f:  # the newest run's size results
            old = [r for r in map(json.loads, f) if r.get("case") in ("synthesize", "shard_build", "loader_read")]
        newest = max((r.get("run", "") for r in old), default="")
        RESULTS.extend(r for r in old if r.get("run", "") == newest)
    work = args.workdir or tempfile.mkdtemp(prefix="clopdit-scale-")
    os.makedirs(work, exist_ok=True)
    args.cfgdir = os.path.join(work, "cfg")
    os.makedirs(args.cfgdir, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]  # none: only fit --fit-from
    args.cases = [c for c in args.cases.split(",") if c]
    if unknown := set(args.cases) - set(CASES):
        sys.exit(f"--cases {','.join(sorted(unknown))}: choose from {','.join(CASES)}")
    text_model = None
    if sizes and "train_step" in args.cases:
        from clopdit_dist.data.captions import caption_corpus
        from clopdit_dist.models.text import build_tiny_text_model

        text_model = build_tiny_text_model(os.path.join(work, "tiny-bert"), caption_corpus())
        stage_configs(args.cfgdir, text_model, args.steps, args.batch)
    for i, n in enumerate(sizes):
        bench_size(n, args, work, text_model, ["ae", "clop", "dit"] if i == 0 else ["ae"])
        if not args.keep and "synthesize" in args.cases:
            import shutil

            shutil.rmtree(os.path.join(work, f"atlas_{n}"), ignore_errors=True)
    fit(args.out)


if __name__ == "__main__":
    main()
