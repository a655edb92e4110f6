"""Caption-bank build time: rank 0 embedding every caption while the other ranks wait (how the
CLOP stage built it before session 17) against every rank embedding its share of the same batches
(``embed_across_ranks``), in the same torchrun job, on a trained run's captions. Both must give
the same features bit for bit; the line says whether they did.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 benchmarks/caption_bank.py \\
        --run-dir runs/demo/run --out benchmarks/results/caption_bank_cpu2.jsonl

One JSON line per mode, the shared one with its speed-up over rank 0 alone.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from _measure import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a trained run (--run would be read by torchrun as its --run-path)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.config import load_config
    from clopdit_dist.data.captions import CaptionBuilder
    from clopdit_dist.data.conditions import train_conditions
    from clopdit_dist.models.condition import CaptionBank, embed_across_ranks
    from clopdit_dist.run import RunDir
    from clopdit_dist.stages.clop import ClopStageConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = RunDir(args.run_dir)
    cfg = load_config(ClopStageConfig, run.config_path("clop"))
    builder = CaptionBuilder.from_manifest(run.manifest(), n_markers=cfg.model.n_markers)
    tower = cfg.model.text_tower()
    # the captions exactly as CaptionBank.build draws them; the embedding is what is timed
    _, captions, _ = CaptionBank.draw(builder, train_conditions(run.manifest()), cfg.model.captions_per_condition,
                                      cfg.train.seed)
    results: list[dict] = []
    dist.barrier()
    t0 = time.perf_counter()
    alone = tower.embed(captions).float().cpu() if rank == 0 else None
    dist.barrier()
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    shared = embed_across_ranks(tower, captions)
    dist.barrier()
    t_shared = time.perf_counter() - t0
    if rank == 0:
        common = {"bench": "caption_bank", "run": args.run_dir, "captions": len(captions), "ranks": world,
                  "threads_per_rank": torch.get_num_threads(), "text_model": cfg.model.text_model}
        emit(args.out, results, **common, mode="rank0_alone", seconds=round(t_alone, 2))
        emit(args.out, results, **common, mode="shared", seconds=round(t_shared, 2),
             speedup=round(t_alone / t_shared, 2), identical=bool(torch.equal(alone, shared)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
