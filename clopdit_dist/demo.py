"""The main job end to end on the embedded atlas: ``clopdit demo --out runs/demo``.

Each step skips what an earlier run already finished (the atlas, complete shards), so a
demo that was interrupted picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import time

from .data.loader import CellLoader, LoaderConfig
from .data.manifest import MANIFEST_NAME
from .data.shards import ShardConfig, build_shards
from .data.synthetic import SynthConfig, write_synthetic_atlas


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(out: str, n_cells: int = 20_000, workers: int = 2) -> dict:
    atlas, shards = os.path.join(out, "atlas"), os.path.join(out, "shards")
    _step(f"1. synthetic Census-shaped atlas ({n_cells} cells) -> {atlas}")
    if os.path.exists(os.path.join(atlas, "census_data")):
        print("already there")
    else:
        write_synthetic_atlas(atlas, SynthConfig(n_cells=n_cells), workers=workers)

    _step(f"2. WebDataset shards -> {shards}")
    if not os.path.exists(os.path.join(shards, MANIFEST_NAME)):
        build_shards(ShardConfig(source=atlas, out=shards, workers=workers))
    else:
        print("already there")

    _step("3. loader throughput (train split, 2,000 HVGs, batch 256)")
    rows = []
    for nw in (0, workers):
        loader = CellLoader(shards, LoaderConfig(split="train", genes="hvg:2000", batch_size=256, num_workers=nw))
        t0, cells = time.perf_counter(), 0
        for batch in loader:
            cells += batch["counts"].shape[0]
        rows.append({"num_workers": nw, "batches": len(loader), "cells": cells,
                     "cells_per_s": round(cells / (time.perf_counter() - t0))})
    print(f"{'workers':>8} {'batches':>8} {'cells':>8} {'cells/s':>9}")
    for r in rows:
        print(f"{r['num_workers']:>8} {r['batches']:>8} {r['cells']:>8} {r['cells_per_s']:>9}")
    summary = {"atlas": atlas, "shards": shards, "loader": rows}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
