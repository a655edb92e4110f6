"""Run under torchrun with 2 processes (gloo): embed a fixed list of captions with
``embed_across_ranks`` and call ``shared_caption_bank`` on a bank file (BANK) that is already there;
rank 0 saves both to the file OUT for tests/test_text_tower.py to compare with one process.

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \\
        tests/scripts/two_rank_caption_bank.py TOWER TEXTS_JSON BANK OUT
"""

import json
import sys

import torch
import torch.distributed as dist

from clopdit_dist.models.condition import embed_across_ranks, shared_caption_bank
from clopdit_dist.models.text import TextTower


def main(tower_path: str, texts_path: str, bank_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tower = TextTower(tower_path, local_files_only=True)
    texts = json.load(open(texts_path))
    feats = embed_across_ranks(tower, texts, batch_size=16)
    # the file is there, so neither rank builds (builder None would fail if one tried)
    bank = shared_caption_bank(bank_path, None, None, None, tower, 0, rank)
    if rank == 0:
        torch.save({"features": feats, "bank_features": bank.features, "world": dist.get_world_size()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
