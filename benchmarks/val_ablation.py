"""Retrain a run from one stage on with config overrides, then score it on the val studies:
how the defaults of ``configs/ae.yaml`` and ``configs/dit.yaml`` were chosen (val only, so the
test studies stay unseen).

``--stage dit`` retrains the DiT alone (reusing the base run's ae, clop and codec);
``--stage ae`` retrains the autoencoder with the overrides, then CLOP and the DiT on its latent
with the demo's settings. Every trial is scored twice: on every val condition with >= 30 cells
(real half, codec round trip: the ceiling of any generator in that latent, and the model at
guidance 1 with its cell-type identity per condition; seen and unseen combinations apart), and
by ``quick_evaluation`` at guidance 1 and 2 (12 conditions, 200 cells each, one seed, the
real-half ceiling, the Gaussian and the copies beside it). ``--score-only`` scores a trial
already trained in ``--workdir``; ``--train-only`` trains it and stops (for a trial that
``val_rule.py`` judges).

    python benchmarks/val_ablation.py --stage dit --base-run runs/demo/run --shards runs/demo/shards \\
        --name lr1e3 --out benchmarks/results/dit_val_ablation.jsonl optim.lr=0.001
    python benchmarks/val_ablation.py --stage ae --base-run runs/demo/run --shards runs/demo/shards \\
        --name latent_noise0.3 --out benchmarks/results/ae_val_ablation.jsonl model.latent_noise=0.3
    python benchmarks/val_ablation.py --stage ae ... --name balance0.5 data.balance=0.5 dit:data.balance=0.5

Unprefixed overrides apply to ``--stage``; ``STAGE:key=value`` to that later stage.

One JSON line per (trial, guidance, generator), and per (trial, generator, seen/unseen/all) on
all val conditions. Trains as the demo does (``clopdit_dist.demo.launch_stage``: its overrides,
then these; later overrides win).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
from _measure import emit


# every val condition with >= 30 cells (EvalConfig's default), at most 40, at most 150 cells a half
VAL_CONDITIONS = dict(split="val", seeds=1, max_conditions=40, max_cells=150, tiers=("canonical",), report=False)
KEEP = ("identity_cell_type", "identity_tissue_general", "identity_disease", "energy", "mmd", "w2", "coverage",
        "diversity_means")


def all_val_conditions(gen, shards: str) -> dict[str, dict]:
    """Real half, codec round trip and the model (canonical prompts, guidance 1) on every val
    condition (``EvalConfig`` defaults: >= 30 cells, <= 40 conditions, <= 150 cells a half), seen
    and unseen combinations apart, and the model's cell-type identity per condition: the
    evaluator's own ``run_set`` (seed 0). The round trip is the ceiling of any generator in
    that latent; ``quick_evaluation``'s 12 conditions leave out most rare types."""
    from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, identity_per_condition, read_cells

    cfg = EvalConfig(**VAL_CONDITIONS)
    ev = Evaluation(gen, shards, cfg, progress=False)
    hs = HeldoutSet("val", read_cells(shards, "val", ev.genes, 20_000), ev.train, ev.train_keys, cfg)
    res = ev.run_set(hs, 1.0, 1, cfg.tiers)
    n = {"seen": sum(not c["novel"] for c in hs.conditions), "unseen": sum(c["novel"] for c in hs.conditions),
         "all": len(hs.conditions)}
    out = {f"{g}/{part}": {"conditions": n[part], **{k: v["mean"] for k, v in res[g][key].items()}}
           for g in ("real_half", "codec_roundtrip", "model_canonical")
           for part, key in (("seen", "macro_seen"), ("unseen", "macro_novel"), ("all", "macro"))}
    out["model_canonical/all"]["identity_cell_type_per_condition"] = identity_per_condition(res["model_canonical"])
    return out


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
    p.add_argument("--score-only", action="store_true", help="score the trial already trained in --workdir")
    p.add_argument("--train-only", action="store_true", help="train the trial, skip the scoring")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from clopdit_dist.demo import DEMO_OVERRIDES, STAGES, launch_stage, stage_overrides
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
    for stage in [] if args.score_only else retrain:
        launch_stage(stage, args.shards, run, args.nproc, stage_overrides(args.overrides, stage, args.stage))
    train_s = time.perf_counter() - t0
    if args.train_only:
        return

    results: list[dict] = []
    common = {"bench": f"{args.stage}_val_ablation", "trial": args.name, "base_run": args.base_run,
              "overrides": DEMO_OVERRIDES[args.stage] + args.overrides, "train_seconds": None if args.score_only else round(train_s, 1),
              "dit_final_loss": final_loss(os.path.join(run, "dit", "log.jsonl"))}
    gen = CellGenerator.from_run(run)
    for key, m in all_val_conditions(gen, args.shards).items():
        generator, part = key.split("/")
        emit(args.out, results, **common, guidance=1.0, generator=generator, conditions_kind=part,
             conditions=m["conditions"], **{k: m[k] for k in KEEP + ("identity_cell_type_per_condition",) if k in m})
    for w in (1.0, 2.0):
        m = quick_evaluation(gen, args.shards, "val", w, 12, 200)
        for g in ("real_half", "gaussian", "training_copies", "model_canonical"):
            per_condition = ({"identity_cell_type_per_condition": m["model_canonical_identity_per_condition"]}
                             if g == "model_canonical" else {})
            emit(args.out, results, **common, guidance=w, generator=g, conditions=m["conditions"],
                 **{k: m[g][k] for k in KEEP if k in m[g]}, **per_condition)


if __name__ == "__main__":
    main()
