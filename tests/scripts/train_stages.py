"""Launched by the tests under torchrun (or `deepspeed --num_gpus 2`): train the given stages
one after another into one run directory, in one process group.

    train_stages.py SHARDS RUN STAGES [--config-dir=DIR] [KEY=VALUE ...]
        STAGES: comma-separated, e.g. ae,clop,dit; DIR holds <stage>.yaml for each stage
"""

import os
import sys

from clopdit_dist.cli import main
from clopdit_dist.train.distributed import exit_process

shards, run, stages = sys.argv[1], sys.argv[2], sys.argv[3]
config_dir = next((a.split("=", 1)[1] for a in sys.argv[4:] if a.startswith("--config-dir=")), None)
overrides = [a for a in sys.argv[4:] if "=" in a and not a.startswith("--")]
for stage in stages.split(","):
    config = ["--config", os.path.join(config_dir, f"{stage}.yaml")] if config_dir else []
    main(["train", stage, "--shards", shards, "--run", run, *config, *overrides])
exit_process(0)
