"""Stage 1: train CLOP (needs the stage-0 autoencoder in the same run directory).

    deepspeed --num_gpus 2 launchers/train_clop.py --config configs/clop.yaml --shards SHARDS --run RUN
    torchrun --nproc_per_node 2 launchers/train_clop.py -- --config configs/clop.yaml --shards SHARDS --run RUN train.zero_stage=2
    python launchers/train_clop.py --config configs/clop.yaml train.steps=100          # one process
    sbatch launchers/slurm/train.sbatch launchers/train_clop.py --config configs/clop.yaml   # multi-node

On CPU set DS_ACCELERATOR=cpu (gloo, fp32 or bf16). Any config key can be overridden as
KEY=VALUE (e.g. train.zero_stage=3 train.precision=bf16 data.batch_size=512).
"""

import sys

from clopdit_dist.cli import entry

if __name__ == "__main__":
    entry(["train", "clop", *sys.argv[1:]])
