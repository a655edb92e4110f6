"""Launched by the tests under `deepspeed --num_gpus 2` (or torchrun): train the given stages
one after another into one run directory, in one process group.

    train_stages.py SHARDS RUN STAGES [KEY=VALUE ...]     (STAGES: comma-separated, e.g. ae,clop)
"""

import sys

from clopdit_dist.cli import main

shards, run, stages, overrides = sys.argv[1], sys.argv[2], sys.argv[3], [a for a in sys.argv[4:] if "=" in a]
for stage in stages.split(","):
    main(["train", stage, "--shards", shards, "--run", run, *overrides])
