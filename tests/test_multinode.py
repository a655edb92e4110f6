"""Two "nodes" on one machine: torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1}
--master_addr 127.0.0.1, as two independent launcher processes, train the ae stage, and the
DiT on a run whose CLOP and PCA codec are trained (the shared ``pca_run``)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
SMALL = ["train.log_every=1", "train.ckpt_every=1000", "data.batch_size=32", "data.num_workers=0",
         "data.genes=hvg:200", "model.hidden=[64,32]", "model.latent_tokens=4", "model.token_dim=8",
         "optim.warmup_steps=2", "train.wandb.mode=disabled", "data.eval_cells=200", "train.steps=4"]
# the pca_run fixture's DiT (tests/conftest.py)
DIT_SMALL = ["train.steps=4", "train.log_every=1", "data.batch_size=32", "data.num_workers=0", "optim.warmup_steps=1",
             "train.wandb.mode=disabled", "data.eval_cells=200", "model.hidden_size=32", "model.token_dim=8",
             "model.depth=2", "model.num_heads=2", "eval_conditions=2", "eval_cells_per_condition=20",
             "stats_cells=500", "sampler.steps=4", "conditioning=fields", "train.ema_decay=0.99"]


@pytest.mark.parametrize("stage", ["ae", "dit"])
def test_two_nodes_train_one_run(shards_dir, tmp_path, stage, request):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(out)
    overrides = SMALL
    if stage == "dit":  # the DiT trains on the CLOP and codec of a run
        shutil.copytree(request.getfixturevalue("pca_run"), run, ignore=shutil.ignore_patterns("dit"))
        overrides = DIT_SMALL
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", "29581",
         os.path.join(HERE, "scripts", "multinode_train.py"), shards_dir, run, out, stage, *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(0, 0, 0, 2), (1, 1, 0, 2)]
    # each rank reads its own data: disjoint held-out shard lists, different training streams
    assert ranks[0]["val_shards"] and not set(ranks[0]["val_shards"]) & set(ranks[1]["val_shards"])
    assert ranks[0]["train_first_batch"] != ranks[1]["train_first_batch"]
    # the logged loss is all-reduced: every rank computed the same value at every step
    a, b = ranks[0]["rows"], ranks[1]["rows"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert np.isfinite(ra["loss"]) and ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]
    # one checkpoint, written once: model states by global rank 0 only, one optimizer shard per rank
    ckpt = os.path.join(run, stage, "checkpoints")
    assert sorted(t for t in os.listdir(ckpt) if not t.endswith(".py")) == ["latest", "step00000004"] and open(os.path.join(ckpt, "latest")).read() == "step00000004"
    saved = [p for r in ranks for p in r["saved"] if p.startswith(f"{stage}/checkpoints/")]
    model_files = [p for p in saved if p.endswith("model_states.pt")]
    assert model_files == [f"{stage}/checkpoints/step00000004/mp_rank_00_model_states.pt"]
    optim = sorted(p for p in saved if p.endswith("optim_states.pt"))
    assert len(optim) == 2 and len(set(optim)) == 2
    ema = sorted(os.path.basename(p) for p in saved if "/ema_rank" in p)  # each rank its EMA (ZeRO-3 would shard it)
    assert ema == ([] if stage == "ae" else ["ema_rank0.pt", "ema_rank1.pt"])
    assert sorted(f for f in os.listdir(os.path.join(ckpt, "step00000004"))) == sorted(
        ["meta.json", *(os.path.basename(p) for p in [*model_files, *optim]), *ema])  # meta.json: world size, loader
    assert os.path.exists(os.path.join(run, stage, "model.safetensors"))
