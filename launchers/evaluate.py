"""Held-out evaluation of a trained run: generated vs real cells, beside ceilings and baselines.

    python launchers/evaluate.py --run runs/demo/run --shards runs/demo/shards --out runs/demo/eval
    python launchers/evaluate.py --run RUN --shards SHARDS --out DIR --split test --seeds 3

Writes DIR/metrics.json (every number, with the configuration and seeds) and DIR/report.md
with PNG plots (UMAP, guidance sweep, per-condition bars, marker dot plot).
"""

import sys

from clopdit_dist.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
