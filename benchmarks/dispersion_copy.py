"""Copy a trained run with its autoencoder's NB dispersion re-estimated the way the ``ae`` stage's
``dispersion: moments`` (or ``thinned``, with ``--dispersion thinned``) does it after training
(``AEStage.moment_dispersion``), everything else (latent, CLOP, DiT) unchanged: how a run is judged
with another dispersion without retraining (session 19's ``theta_mom`` candidate; README, "The
current defaults (session 19)"; session 23's ``thin``). The copy's ``ae/config.yaml`` records it.

    python benchmarks/dispersion_copy.py --run W/puncond_s0/run --out W/thmom_s0/run \\
        --out-lines benchmarks/results/dispersion_copy.jsonl

Checkpoints and W&B files are not copied. One JSON line: the new over the run's own inverse
dispersion (``theta_over_learned``: the one the run exported), quantiles over genes.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import yaml
from _measure import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run whose codec is the autoencoder")
    p.add_argument("--out", required=True, help="the copy's run directory (created)")
    p.add_argument("--shards", default=None, help="training shards (default: the ones the ae stage read)")
    p.add_argument("--dispersion", choices=("moments", "thinned"), default="moments",
                   help="the ae stage's estimator (AEStage.moment_dispersion): on each cell's own mean, or thinned")
    p.add_argument("--out-lines", default=None)
    args = p.parse_args()

    from clopdit_dist.config import load_config_section
    from clopdit_dist.models.autoencoder import AEConfig
    from clopdit_dist.run import RunDir
    from clopdit_dist.stages.ae import AEStage, AEStageConfig
    from clopdit_dist.train.config import DataConfig

    src = RunDir(args.run)
    data = load_config_section(DataConfig, src.config_path("ae"), "data")
    if args.shards:
        data.shards = args.shards
    stage = AEStage(AEStageConfig(model=load_config_section(AEConfig, src.config_path("ae"), "model"), data=data,
                                  dispersion=args.dispersion))
    weights = src.load_weights("ae")
    learned = weights["log_theta"].exp()
    theta = stage.moment_dispersion(weights, thinned=args.dispersion == "thinned")
    shutil.copytree(args.run, args.out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    dst = RunDir(args.out)
    dst.save_weights("ae", {**weights, "log_theta": theta.log()}, src.load_weights_metadata("ae"))
    with open(dst.config_path("ae")) as f:
        config = yaml.safe_load(f)
    with open(dst.config_path("ae"), "w") as f:
        yaml.safe_dump({**config, "dispersion": args.dispersion}, f, sort_keys=False)
    ratio = (theta / learned).numpy()
    emit(args.out_lines, [], bench="dispersion_copy", run=os.path.abspath(args.run), copy=os.path.abspath(args.out),
         dispersion=args.dispersion,
         **{f"theta_over_learned_q{int(q * 100)}": round(float(np.quantile(ratio, q)), 4) for q in (0.1, 0.5, 0.9)})


if __name__ == "__main__":
    main()
