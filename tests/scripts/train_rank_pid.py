"""Launched by tests/test_faults.py under torchrun: write this rank's pid to PIDS/rank{RANK},
then train the given stage, each step slowed by 0.25 s so a test can kill one rank between
two checkpoints (the sleep changes no number the run computes).

    train_rank_pid.py SHARDS RUN PIDS STAGE [KEY=VALUE ...]
"""

import os
import sys
import time

from clopdit_dist.cli import main
from clopdit_dist.train.metrics import MetricsLogger

shards, run, pids, stage = sys.argv[1:5]
os.makedirs(pids, exist_ok=True)
with open(os.path.join(pids, f"rank{os.environ['RANK']}.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(pids, f"rank{os.environ['RANK']}.tmp"), os.path.join(pids, f"rank{os.environ['RANK']}"))

_step = MetricsLogger.step


def slow_step(self, *args, **kwargs):
    time.sleep(0.25)
    return _step(self, *args, **kwargs)


MetricsLogger.step = slow_step
main(["train", stage, "--shards", shards, "--run", run, *sys.argv[5:]])
