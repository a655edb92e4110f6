"""Launched by tests/test_multinode.py on each of two "nodes" (torchrun --nnodes 2
--nproc_per_node 1 --node_rank R): trains one stage, recording on every rank what only
rank 0 normally logs, and which files each rank saved, into OUT/rank{R}.json.

    multinode_train.py SHARDS RUN OUT STAGE [KEY=VALUE ...]
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from clopdit_dist.cli import main
from clopdit_dist.data.loader import CellLoader, LoaderConfig
from clopdit_dist.train import tracking

shards, run, out, stage = sys.argv[1:5]
rows, saved = [], []
_log, _save = tracking.Tracker.log, torch.save


def log_every_rank(self, step, metrics, progress=True):  # the all-reduced row, as each rank computed it
    rows.append({"step": step, **{k: tracking._num(v) for k, v in metrics.items()}})
    return _log(self, step, metrics, progress)


def recording_save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)):
        saved.append(os.path.relpath(str(f), run))
    return _save(obj, f, *a, **k)


tracking.Tracker.log = log_every_rank
torch.save = recording_save
main(["train", stage, "--shards", shards, "--run", run, *sys.argv[5:]])
rank, world = dist.get_rank(), dist.get_world_size()
train = CellLoader(shards, LoaderConfig(split="train", genes="hvg:50", batch_size=32, num_workers=0))
first = next(iter(train))["soma_joinid"].tolist()
val = CellLoader(shards, LoaderConfig(split="val", genes="hvg:50", batch_size=32, num_workers=0))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world_size": world, "node_rank": int(os.environ["GROUP_RANK"]),
               "local_rank": int(os.environ["LOCAL_RANK"]), "rows": rows, "saved": saved,
               "train_first_batch": first, "val_shards": val.dataset.urls[rank::world],
               "train_shards": train.dataset.urls}, f)
dist.barrier()
dist.destroy_process_group()
