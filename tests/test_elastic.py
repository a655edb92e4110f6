"""Elastic resume under ZeRO 1, 2 and 3: a checkpoint taken with 2 processes resumes with 1, and that one with 2
again (2 -> 1 -> 2), optimizer state and LR schedule included, the loader keeping its place
in the epoch: with ``data.exact=true`` the cells not yet drawn pass to the new world
(clopdit_dist/train/checkpoint.py states each stream's guarantee)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clopdit_dist.data.epoch import EpochOrder
from clopdit_dist.data.loader import LoaderConfig
from clopdit_dist.data.manifest import Manifest
from clopdit_dist.train.engine import lr_lambda

HERE = os.path.dirname(__file__)
SMALL = ["train.log_every=1", "train.ckpt_every=1000", "data.batch_size=32", "data.num_workers=0",
         "data.genes=hvg:200", "model.hidden=[64,32]", "model.latent_tokens=4", "model.token_dim=8",
         "optim.warmup_steps=2", "train.wandb.mode=disabled", "data.eval_cells=100", "train.ema_decay=0.9",
         "optim.lr=0.001"]


def _run(shards, run, steps, nproc, zero, exact):
    script = [os.path.join(HERE, "scripts", "train_stages.py"), shards, run, "ae", *SMALL,
              f"train.steps={steps}", f"train.zero_stage={zero}", f"data.exact={exact}"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29591"]
           if nproc > 1 else [sys.executable]) + script
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.parametrize("zero,exact", [(1, False), (2, True), (3, False)], ids=["zero1", "zero2-exact", "zero3"])
def test_two_to_one_to_two_processes(shards_dir, tmp_path, zero, exact):
    run = str(tmp_path / "run")
    _run(shards_dir, run, 3, 2, zero, exact)
    out = _run(shards_dir, run, 5, 1, zero, exact)  # 2 -> 1
    assert "elastic resume: step00000003 from 2 to 1 ranks" in out
    out = _run(shards_dir, run, 7, 2, zero, exact)  # 1 -> 2
    assert "elastic resume: step00000005 from 1 to 2 ranks" in out
    ckpt = os.path.join(run, "ae", "checkpoints")
    # the universal checkpoint carries the Adam moments of every parameter
    assert glob.glob(os.path.join(ckpt, "step00000005_universal", "zero", "*", "exp_avg_sq.pt"))
    rows = [json.loads(line) for line in open(os.path.join(run, "ae", "log.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert all(np.isfinite(r["loss"]) for r in rows)
    for r in rows:  # the LR schedule continued where it was, across both world-size changes
        total = 7 if r["step"] > 5 else (5 if r["step"] > 3 else 3)  # train.steps of the run that logged it
        assert r["lr"] == pytest.approx(1e-3 * lr_lambda(r["step"], 2, total, 0.1), rel=1e-6), r["step"]
    meta5 = json.load(open(os.path.join(ckpt, "step00000005", "meta.json")))
    meta7 = json.load(open(os.path.join(ckpt, "step00000007", "meta.json")))
    assert (meta5["world_size"], meta7["world_size"]) == (1, 2)
    if exact:  # what was left of the epoch went to the new world: 2 x 3 batches drawn, then 1 x 2
        epoch = EpochOrder(Manifest.load(shards_dir).block_cells("train"), 0, 0, LoaderConfig.mix_blocks, 32)
        left = [sum(b - a for a, b in m["loader"]["ranges"]) for m in (meta5, meta7)]
        assert left == [epoch.n_batches - 6, epoch.n_batches - 6 - 2]
        assert meta5["loader"]["batches_done"] == 2 and meta7["loader"]["batches_done"] == 2
    else:  # epoch and consumed batches carried over (2 ranks x 3 = 6 -> 6 on 1 rank)
        assert meta5["loader"]["batches_done"] == 6 + 2 and meta7["loader"]["batches_done"] == 4 + 2
    assert rows[-1]["loss"] < rows[0]["loss"]
