"""Retrain only the DiT of an existing run with config overrides, then score it on the val
studies at guidance 1 and 2 (``quick_evaluation``: 12 conditions, 200 cells each, one seed,
the real-half ceiling, the Gaussian and the copies beside it). How the DiT defaults in
``configs/dit.yaml`` were chosen; val only, so the test studies stay unseen.

    python benchmarks/dit_val_ablation.py --base-run runs/demo/run --shards runs/demo/shards \
        --name lr1e3 --out benchmarks/results/dit_val_ablation.jsonl optim.lr=0.001

One JSON line per (trial, guidance, generator). Trains as the demo trains its DiT
(``clopdit_dist.demo.launch_stage``: its overrides, then these; later overrides win).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from _measure import emit

# benchmarks/kernels.py would shadow the kernels package: put the repository first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEEP = ("identity_cell_type", "identity_tissue_general", "identity_disease", "energy", "mmd", "w2", "coverage",
        "diversity_means")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-run", required=True, help="run whose ae, clop and codec are reused")
    p.add_argument("--shards", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--workdir", default="/tmp/dit_val_ablation")
    p.add_argument("--out", default=None)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from clopdit_dist.demo import DEMO_OVERRIDES, launch_stage
    from clopdit_dist.evaluate.evaluator import quick_evaluation
    from clopdit_dist.generate import CellGenerator

    run = os.path.join(args.workdir, args.name, "run")
    os.makedirs(run, exist_ok=True)
    for item in ("ae", "clop", "pca", "codec.json", "manifest.json", "run.json"):
        src, dst = os.path.join(args.base_run, item), os.path.join(run, item)
        if os.path.exists(src) and not os.path.exists(dst):
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    t0 = time.perf_counter()
    launch_stage("dit", args.shards, run, args.nproc, tuple(args.overrides))
    train_s = time.perf_counter() - t0

    gen = CellGenerator.from_run(run)
    results: list[dict] = []
    for w in (1.0, 2.0):
        m = quick_evaluation(gen, args.shards, "val", w, 12, 200)
        for g in ("real_half", "gaussian", "training_copies", "model_canonical"):
            emit(args.out, results, bench="dit_val_ablation", trial=args.name,
                 overrides=DEMO_OVERRIDES["dit"] + args.overrides, guidance=w,
                 generator=g, conditions=m["conditions"], train_seconds=round(train_s, 1),
                 **{k: m[g][k] for k in KEEP if k in m[g]})


if __name__ == "__main__":
    main()
