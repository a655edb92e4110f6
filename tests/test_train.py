"""The training loop with real DeepSpeed engines: two processes under every ZeRO stage,
exact resume after SIGTERM, the non-finite guard, typed configs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from clopdit_dist.config import ConfigError, load_config
from clopdit_dist.stages.ae import AEStageConfig
from clopdit_dist.train.run import RunDir, RunDirError
from clopdit_dist.train.trainer import lr_lambda

HERE = os.path.dirname(__file__)
SMALL = ["train.log_every=1", "train.ckpt_every=1000", "data.batch_size=32", "data.num_workers=0",
         "data.genes=hvg:200", "model.hidden=[64,32]", "model.latent_tokens=4", "model.token_dim=8",
         "optim.warmup_steps=2", "train.wandb.mode=disabled", "data.eval_cells=300"]


def env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def log_rows(run, stage="ae"):
    with open(os.path.join(run, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_config_errors_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*valid keys under 'train'.*steps"):
        load_config(AEStageConfig, None, ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  latent_tokens: 4\n  laten_dim: 3\n")
    with pytest.raises(ConfigError, match="model.laten_dim.*latent_tokens"):
        load_config(AEStageConfig, str(bad))
    with pytest.raises(ConfigError, match="steps"):
        load_config(AEStageConfig, None, ["train.steps=many"])
    cfg = load_config(AEStageConfig, os.path.join(HERE, "..", "configs", "ae.yaml"), ["train.steps=7"])
    assert cfg.train.steps == 7 and list(cfg.model.hidden) == [1024, 512]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_lambda(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def _launch(shards, run, stages, overrides, nproc=2, port=29561):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           os.path.join(HERE, "scripts", "train_stages.py"), shards, run, stages, *overrides]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("zero,extra", [
    (1, ["train.precision=fp32"]),
    (2, ["train.precision=bf16", "train.grad_accum=2"]),
    (3, ["train.precision=fp32", "train.ema_decay=0.9"]),
], ids=["zero1-fp32", "zero2-bf16-accum2", "zero3-ema"])
def test_two_process_training_under_each_zero_stage(shards_dir, tmp_path, zero, extra):
    run = str(tmp_path / "run")
    _launch(shards_dir, run, "ae", [*SMALL, f"train.zero_stage={zero}", "train.steps=8", *extra],
            port=29561 + zero)
    rows = log_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["cells_per_s"] > 0 and "grad_norm" in rows[0]
    metrics = RunDir(run).metrics("ae")
    assert metrics["cells"] > 0 and -1 <= metrics["gene_mean_pearson"] <= 1
    from clopdit_dist.stages.ae import load_autoencoder

    model, _ = load_autoencoder(RunDir(run))
    assert model.cfg.latent_dim == 32 and model.cfg.n_genes == 200
    assert os.path.exists(os.path.join(run, "ae", "checkpoints", "latest"))


def _single(shards, run, steps, extra=()):
    return [sys.executable, os.path.join(HERE, "scripts", "train_stages.py"), shards, run, "ae",
            *SMALL, f"train.steps={steps}", "data.num_workers=1", *extra]


def test_killed_run_resumes_onto_the_same_loss_curve(shards_dir, tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(_single(shards_dir, ref, 14), env=env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_single(shards_dir, run, 14, ["train.ckpt_every=5"]), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(run, "ae", "checkpoints", "step00000005")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a scheduler's preemption notice
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "checkpoint saved at step" in out
    stopped_at = len(log_rows(run))
    assert 5 <= stopped_at < 14
    resumed = subprocess.run(_single(shards_dir, run, 14, ["train.ckpt_every=5"]), env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from" in resumed.stdout
    a = {r["step"]: r["loss"] for r in log_rows(ref)}
    b = {r["step"]: r["loss"] for r in log_rows(run)}
    assert sorted(b) == list(range(1, 15))
    for step in range(1, 15):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    wa, wb = RunDir(ref).load_weights("ae"), RunDir(run).load_weights("ae")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_run_dir_refuses_other_shards_and_other_schema(shards_dir, tmp_path, atlas_dir):
    run = RunDir(str(tmp_path / "r"))
    run.init(shards_dir)
    run.init(shards_dir)  # same shards: fine
    from conftest import shard_config
    from clopdit_dist.data.shards import build_shards

    other = str(tmp_path / "other")
    build_shards(shard_config(atlas_dir, other, seed=5), progress=False, log=lambda *_: None)
    with pytest.raises(RunDirError, match="was made from shards"):
        run.init(other)
    info = json.load(open(run.info_path))
    info["schema_version"] = 0
    json.dump(info, open(run.info_path, "w"))
    with pytest.raises(RunDirError, match="schema version 0"):
        run.manifest()
