"""Run under torchrun with 2 processes: each rank reads the train split (resampled) and the
val + test splits (exactly once) and writes what it saw to OUT/rank{R}.json."""

import json
import os
import sys

import torch.distributed as dist

from clopdit_dist.data.loader import CellLoader, LoaderConfig

shards, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
seen = {}
for split, workers in (("train", 2), ("val", 0), ("test", 2)):
    loader = CellLoader(shards, LoaderConfig(split=split, genes="hvg:50", batch_size=32, num_workers=workers))
    ids, batches = [], 0
    for batch in loader:
        batches += 1
        ids += batch["soma_joinid"].tolist()
    seen[split] = {"batches": batches, "len": len(loader), "ids": ids}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world_size": dist.get_world_size(), **seen}, f)
dist.barrier()
dist.destroy_process_group()
