"""What the benchmarks share: one JSON line per result, and the peak RSS of process trees."""

from __future__ import annotations

import json
import os
import platform
import threading
import time

import numpy as np
import psutil


def commit() -> str | None:
    """The checkout's commit the benchmark runs on (``-dirty`` with uncommitted changes), or None outside git."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def emit(out: str | None, results: list[dict], **row) -> dict:
    """Print ``row`` (with host facts and the commit) as one JSON line, append it to ``out`` and ``results``."""
    row = {**row, "host_cpus": os.cpu_count(), "python": platform.python_version(), "commit": _COMMIT}
    results.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    return row


_COMMIT = commit()


class PeakRSS:
    """Peak resident memory of processes and all their descendants, sampled every ``interval`` s."""

    def __init__(self, pids: list[int], interval: float = 0.05):
        self.procs, self.peak, self._stop = [psutil.Process(p) for p in pids], 0, threading.Event()
        self.interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for root in self.procs:
                try:
                    for p in [root] + root.children(recursive=True):
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def add_atlas_run_args(p, split: str) -> None:
    """The arguments of a benchmark that rescores a run on shards of the embedded atlas (whose truth it reads)."""
    p.add_argument("--run", required=True)
    p.add_argument("--shards", required=True, help="shards built from the embedded atlas of --atlas-seed")
    p.add_argument("--atlas-seed", type=int, required=True)
    p.add_argument("--atlas-cells", type=int, default=20_000)
    p.add_argument("--split", default=split)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", required=True)
    p.add_argument("--out", default=None)


def atlas_columns(atlas, genes: list[str]) -> np.ndarray:
    """The embedded atlas's gene columns of ``genes`` (feature ids, e.g. a codec's), in that order."""
    index = {f: j for j, f in enumerate(atlas.var["feature_id"])}
    return np.array([index[g] for g in genes])
