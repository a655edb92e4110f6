"""Offline W&B sweeps: the shipped CLOP sweep YAML, two trials proposed by the `sweeps`
package on a base run's trained autoencoder, each logged to W&B offline, the best printed."""

import glob
import json
import os

import pytest
import yaml

HERE = os.path.dirname(__file__)
ROOT = os.path.join(HERE, "..")
AE_SMALL = ["train.log_every=1", "train.ckpt_every=1000", "data.batch_size=32", "data.num_workers=0",
            "data.genes=hvg:200", "model.hidden=[64,32]", "model.latent_tokens=4", "model.token_dim=8",
            "optim.warmup_steps=2", "train.wandb.mode=disabled", "data.eval_cells=200", "train.steps=3"]


def test_sweep_yamls_pass_dotted_overrides_and_name_a_metrics_key():
    for stage, key in (("dit", "model_canonical.identity_cell_type"), ("clop", "zero_shot_canonical.accuracy")):
        sweep = yaml.safe_load(open(os.path.join(ROOT, "configs", "sweeps", f"{stage}.yaml")))
        assert sweep["metric"]["name"] == key and "${args_no_hyphens}" in sweep["command"]
        assert all("." in k for k in sweep["parameters"])  # dotted config keys
        from clopdit_dist.config import load_config
        from clopdit_dist.train.sweep import STAGES, sweep_stage

        import importlib

        assert sweep_stage(sweep, f"{stage}.yaml") == stage
        mod, _, cfg_cls = STAGES[stage]
        values = {k: (v["values"][0] if "values" in v else v["min"]) for k, v in sweep["parameters"].items()}
        from clopdit_dist.train.sweep import trial_overrides

        load_config(getattr(importlib.import_module(mod), cfg_cls), None, trial_overrides(values))  # keys exist


def test_offline_clop_sweep_runs_two_trials_on_a_base_run(shards_dir, tiny_text_model, tmp_path, monkeypatch, capsys):
    pytest.importorskip("sweeps")  # scripts/install.sh: pip install --no-deps sweeps
    import torch.distributed as dist

    from clopdit_dist.config import load_config
    from clopdit_dist.stages.ae import AEStage, AEStageConfig
    from clopdit_dist.train.sweep import run_sweep
    from clopdit_dist.train.trainer import train

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base, root = str(tmp_path / "base"), str(tmp_path / "sweep")
    try:
        train(AEStage(load_config(AEStageConfig, None, [*AE_SMALL, f"train.run_dir={base}",
                                                        f"data.shards={shards_dir}"])))
        best = run_sweep(os.path.join(ROOT, "configs", "sweeps", "clop.yaml"), trials=2, shards=shards_dir,
                         run_root=root, base_config=os.path.join(ROOT, "configs", "clop.yaml"), base_run=base,
                         overrides=["train.steps=2", "train.log_every=1", "data.batch_size=32", "data.num_workers=0",
                                    f"model.text_model={tiny_text_model}", "model.hidden=32",
                                    "model.captions_per_condition=4", "data.eval_cells=200",
                                    "optim.warmup_steps=1"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    rows = [json.loads(line) for line in open(os.path.join(root, "sweep.jsonl"))]
    assert [r["trial"] for r in rows] == ["trial-000", "trial-001"]
    for r in rows:
        metrics = json.load(open(os.path.join(r["run_dir"], "clop", "metrics.json")))
        assert r["zero_shot_canonical.accuracy"] == metrics["zero_shot_canonical"]["accuracy"]
        assert os.path.islink(os.path.join(r["run_dir"], "ae"))  # the base run's autoencoder, linked
        assert set(r["params"]) == set(yaml.safe_load(open(os.path.join(ROOT, "configs", "sweeps", "clop.yaml")))
                                       ["parameters"])
        assert glob.glob(os.path.join(r["run_dir"], "wandb", "offline-run-*"))  # one W&B run per trial
    assert rows[0]["params"] != rows[1]["params"]
    assert best["zero_shot_canonical.accuracy"] == max(r["zero_shot_canonical.accuracy"] for r in rows)
    assert f"best of 2 trials (maximize zero_shot_canonical.accuracy): {best['trial']}" in capsys.readouterr().out
