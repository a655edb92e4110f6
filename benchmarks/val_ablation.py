"""Retrain a run from one stage on with config overrides, then score it on the val studies:
how the defaults of ``configs/ae.yaml`` and ``configs/dit.yaml`` were chosen (val only, so the
test studies stay unseen).

``--stage dit`` retrains the DiT alone (reusing the base run's ae, clop and codec);
``--stage ae`` retrains the autoencoder with the overrides, then CLOP and the DiT on its latent
with the demo's settings, and also scores the codec round trip (encode real val cells, sample
counts back) on every val condition with >= 30 cells, seen and unseen combinations apart: the
ceiling of any generator in that latent. The model is scored by ``quick_evaluation`` at
guidance 1 and 2 (12 conditions, 200 cells each, one seed, the real-half ceiling, the
Gaussian and the copies beside it).

    python benchmarks/val_ablation.py --stage dit --base-run runs/demo/run --shards runs/demo/shards \\
        --name lr1e3 --out benchmarks/results/dit_val_ablation.jsonl optim.lr=0.001
    python benchmarks/val_ablation.py --stage ae --base-run runs/demo/run --shards runs/demo/shards \\
        --name latent_noise0.3 --out benchmarks/results/ae_val_ablation.jsonl model.latent_noise=0.3

One JSON line per (trial, guidance, generator), and per (trial, generator, seen/unseen) for the
codec round trip. Trains as the demo does (``clopdit_dist.demo.launch_stage``: its overrides,
then these; later overrides win).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
from _measure import emit

# benchmarks/kernels.py would shadow the kernels package: put the repository first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEEP = ("identity_cell_type", "identity_tissue_general", "identity_disease", "energy", "mmd", "w2", "coverage",
        "diversity_means")
STAGES = ("ae", "clop", "dit")


def codec_roundtrip_val(gen, shards: str) -> dict[str, dict]:
    """Real half and codec round trip on every val condition (``EvalConfig`` defaults: >= 30
    cells, <= 40 conditions, <= 150 cells a half), seen and unseen combinations apart: the
    evaluator's own ``run_set`` (seed 0, guidance 1), of which these two generators are kept."""
    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, read_cells

    cfg = EvalConfig(split="val", seeds=1, max_conditions=40, max_cells=150, tiers=("canonical",), report=False)
    ev = Evaluation(gen, shards, cfg, progress=False)
    hs = HeldoutSet("val", read_cells(shards, "val", ev.genes, 20_000), ev.train, ev.train_keys, cfg)
    res = ev.run_set(hs, 1.0, 1, cfg.tiers)
    n = {"seen": sum(not c["novel"] for c in hs.conditions), "unseen": sum(c["novel"] for c in hs.conditions)}
    return {f"{g}/{part}": {"conditions": n[part], **{k: v["mean"] for k, v in res[g][f"macro_{key}"].items()}}
            for g in ("real_half", "codec_roundtrip") for part, key in (("seen", "seen"), ("unseen", "novel"))}


def final_loss(log: str, last: int = 100) -> float:
    """Mean training loss over the last ``last`` steps logged: where the flow loss settled."""
    with open(log) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    end = rows[-1]["step"]
    return round(float(np.mean([r["loss"] for r in rows if r["step"] > end - last])), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("ae", "dit"), default="dit", help="first stage retrained; overrides apply to it")
    p.add_argument("--base-run", required=True, help="run whose earlier stages (and codec) are reused")
    p.add_argument("--shards", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--workdir", default="/tmp/val_ablation")
    p.add_argument("--out", default=None)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from clopdit_dist.demo import DEMO_OVERRIDES, launch_stage
    from clopdit_dist.evaluate.evaluator import quick_evaluation
    from clopdit_dist.generate import CellGenerator

    run = os.path.join(args.workdir, args.name, "run")
    os.makedirs(run, exist_ok=True)
    retrain = STAGES[STAGES.index(args.stage):]
    reuse = [s for s in STAGES if s not in retrain] + ["manifest.json", "run.json"]
    reuse += ["pca", "codec.json"] if args.stage != "ae" else []
    for item in reuse:
        src, dst = os.path.join(args.base_run, item), os.path.join(run, item)
        if os.path.exists(src) and not os.path.exists(dst):
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    t0 = time.perf_counter()
    for stage in retrain:
        launch_stage(stage, args.shards, run, args.nproc, tuple(args.overrides) if stage == args.stage else ())
    train_s = time.perf_counter() - t0

    results: list[dict] = []
    common = {"bench": f"{args.stage}_val_ablation", "trial": args.name, "base_run": args.base_run,
              "overrides": DEMO_OVERRIDES[args.stage] + args.overrides, "train_seconds": round(train_s, 1),
              "dit_final_loss": final_loss(os.path.join(run, "dit", "log.jsonl"))}
    gen = CellGenerator.from_run(run)
    if args.stage == "ae":
        for key, m in codec_roundtrip_val(gen, args.shards).items():
            generator, part = key.split("/")
            emit(args.out, results, **common, generator=generator, conditions_kind=part,
                 conditions=m["conditions"], **{k: m[k] for k in KEEP if k in m})
    for w in (1.0, 2.0):
        m = quick_evaluation(gen, args.shards, "val", w, 12, 200)
        for g in ("real_half", "gaussian", "training_copies", "model_canonical"):
            emit(args.out, results, **common, guidance=w, generator=g, conditions=m["conditions"],
                 **{k: m[g][k] for k in KEEP if k in m[g]})


if __name__ == "__main__":
    main()
