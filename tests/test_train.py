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
from clopdit_dist.run import RunDir, RunDirError
from clopdit_dist.stages.ae import AEStageConfig
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


def test_min_epochs_raises_the_steps_to_that_many_passes_over_the_training_cells():
    from clopdit_dist.train.config import TrainConfig
    from clopdit_dist.train.trainer import steps_for_epochs

    # the demo's DiT preset: 4,000 steps of 256 cells are 76 passes over 13,447 cells; 70 passes change nothing there
    assert steps_for_epochs(TrainConfig(steps=4000, min_epochs=70), 13_447, 256) == 4000
    assert steps_for_epochs(TrainConfig(steps=4000, min_epochs=70), 32_406, 256) == 8862  # 2.4x the cells
    assert steps_for_epochs(TrainConfig(steps=4000), 32_406, 256) == 4000  # off by default


def test_launcher_under_torchrun_as_documented(shards_dir, tmp_path):
    """README's torchrun line: the launcher's --run after "--" (without it torchrun stops on
    "ambiguous option: --run could match --run-path")."""
    run = str(tmp_path / "run")
    launcher = os.path.join(HERE, "..", "launchers", "train_ae.py")
    args = ["--config", os.path.join(HERE, "..", "configs", "ae.yaml"), "--shards", shards_dir, "--run", run,
            *SMALL, "train.steps=2"]
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29567", launcher]
    proc = subprocess.run([*base, "--", *args], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert [r["step"] for r in log_rows(run)] == [1, 2]


CLOP_SMALL = ["model.embed_dim=16", "model.hidden=32", "model.captions_per_condition=4"]
DIT_SMALL = ["model.hidden_size=32", "model.token_dim=8", "model.depth=2", "model.num_heads=2",
             "eval_conditions=2", "eval_cells_per_condition=20", "stats_cells=500", "sampler.steps=4"]
RUNS = {}


@pytest.mark.parametrize("zero,extra", [
    (1, ["train.precision=fp32", "train.ema_decay=0.9"]),
    (2, ["train.precision=bf16", "train.grad_accum=2"]),
    (3, ["train.precision=fp32", "train.ema_decay=0.9"]),
], ids=["zero1-ema", "zero2-bf16-accum2", "zero3-ema"])
def test_two_process_training_of_every_stage_under_each_zero_stage(shards_dir, tmp_path_factory, tiny_text_model,
                                                                   zero, extra):
    """ae, clop and dit, each trained by two DeepSpeed processes (gloo), one after another."""
    run = str(tmp_path_factory.mktemp(f"zero{zero}") / "run")
    # Overrides are shared by the three stage configs where the key exists in each;
    # stage-specific ones go through a per-stage YAML.
    cfgdir = tmp_path_factory.mktemp(f"cfg{zero}")
    common = [f"train.zero_stage={zero}", "train.steps=6", *extra]
    balance = ["data.balance=0.5"] if zero == 2 else []  # rare-type loss weights in the ae and dit losses
    # the autoencoder's cell-type and disease heads on z, and its dispersion re-estimated by moments after training
    ae_options = ["model.type_loss=50", "model.disease_loss=20", "dispersion=moments"] if zero == 2 else []
    for stage, own in (("ae", [o for o in SMALL if o.startswith("model.")] + balance + ae_options),
                       ("clop", [f"model.text_model={tiny_text_model}", *CLOP_SMALL]),
                       # both conditioning modes; both flow sources (configs/dit.yaml's cell_type on the zero1
                       # and zero3 runs, which the generation and EMA tests use; N(0, I) on zero2)
                       # zero2 also drops every field at once (flow.p_null)
                       ("dit", DIT_SMALL + balance + (["conditioning=caption", "flow.p_null=0.1"] if zero == 2 else [])
                        + (["flow.prior=cell_type"] if zero != 2 else []))):
        from omegaconf import OmegaConf

        conf = OmegaConf.from_dotlist([*[o for o in SMALL if not o.startswith("model.")], *common, *own])
        OmegaConf.save(conf, cfgdir / f"{stage}.yaml")
    _launch(shards_dir, run, "ae,clop,dit", [f"--config-dir={cfgdir}"], port=29561 + zero)
    for stage in ("ae", "clop", "dit"):
        rows = log_rows(run, stage)
        assert [r["step"] for r in rows] == list(range(1, 7)), stage
        assert all(np.isfinite(r["loss"]) for r in rows), stage
        assert rows[0]["cells_per_s"] > 0 and "grad_norm" in rows[0]
        assert os.path.exists(os.path.join(run, stage, "checkpoints", "latest"))
    assert log_rows(run, "ae")[-1]["loss"] < log_rows(run, "ae")[0]["loss"]
    metrics = RunDir(run).metrics("ae")
    assert metrics["cells"] > 0 and -1 <= metrics["gene_mean_pearson"] <= 1
    clop = RunDir(run).metrics("clop")
    assert 0 <= clop["zero_shot_canonical"]["accuracy"] <= 1 and clop["classes"] >= 25
    dit = RunDir(run).metrics("dit")
    assert 1 <= dit["conditions"] <= 2 and 0 <= dit["model_canonical"]["identity_cell_type"] <= 1
    from clopdit_dist.models.codec import LatentCodec, load_codec

    codec = load_codec(RunDir(run))
    assert isinstance(codec, LatentCodec) and codec.name == "autoencoder"
    assert codec.latent_dim == 32 and codec.model.cfg.n_genes == 200 and len(codec.genes) == 200
    # the head is built from the saved config (one output per training cell type) and its loss is logged
    n_types = len([t for t, n in RunDir(run).manifest().data["cell_types"]["train"].items() if n > 0])
    assert (codec.model.type_head is not None and codec.model.type_head.out_features == n_types) == (zero == 2)
    assert all(("type_ce" in r) == ("disease_ce" in r) == (zero == 2) for r in log_rows(run, "ae"))
    n_diseases = len({c["disease"] for c in RunDir(run).manifest().data["conditions"]["splits"]["train"]})
    assert (codec.model.disease_head is not None and codec.model.disease_head.out_features == n_diseases) == (zero == 2)
    if zero == 2:  # the exported theta: moments on the training cells' eval-mode means, not the learned one
        from clopdit_dist.data.loader import iter_split
        from clopdit_dist.models.autoencoder import nb_theta_by_moments

        x = torch.cat([b["counts"] for b in iter_split(shards_dir, "train", codec.genes, 20_000, batch_size=2048)])
        with torch.no_grad():
            mu = codec.decode(codec.encode(x), x.sum(-1))["mu"]
        torch.testing.assert_close(codec.model.log_theta.exp(), nb_theta_by_moments(x, mu), rtol=1e-4, atol=0)
    RUNS[zero] = run


def test_ema_weights_agree_between_zero1_and_zero3():
    """The same fp32 training under ZeRO-1 (full replicas) and ZeRO-3 (partitioned) exports
    the same EMA weights: EMA is correct under parameter partitioning."""
    if not {1, 3} <= set(RUNS):
        pytest.skip("needs the zero1 and zero3 runs of this module")
    for stage in ("ae", "dit"):
        a, b = RunDir(RUNS[1]).load_weights(stage), RunDir(RUNS[3]).load_weights(stage)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=2e-4, msg=f"{stage}.{k}")


def test_dit_trains_on_the_conditions_generation_feeds_it():
    """Field mode, text+code (the default): the condition a training cell gets (its field
    values' bank texts, without jitter) equals what generation builds for those values."""
    if 1 not in RUNS:
        pytest.skip("needs the zero1 run of this module")
    from clopdit_dist.data.conditions import CONDITION_FIELDS, train_conditions
    from clopdit_dist.stages.dit import DiTStage, DiTStageConfig

    run = RunDir(RUNS[1])
    cfg = load_config(DiTStageConfig, run.config_path("dit"))
    assert cfg.conditioning == "fields" and cfg.field_encoding == "text+code"
    cfg.cond_noise = 0.0
    stage = DiTStage(cfg)
    stage.genes(run)
    stage.setup(run, None, torch.device("cpu"))
    conds = train_conditions(run.manifest())[:6]
    batch = {f: [c[f] for c in conds] for f in CONDITION_FIELDS}
    trained = stage.conditions_of(batch, np.random.default_rng(0))
    torch.testing.assert_close(trained, stage.cond.encode_fields(conds), rtol=1e-5, atol=1e-6)


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
    assert "resumed from" in resumed.stdout
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


class _FlakyAE:
    """An autoencoder stage whose first ``bad`` losses are NaN."""

    @staticmethod
    def make(cfg, bad):
        from clopdit_dist.stages.ae import AEStage

        class Flaky(AEStage):
            calls = 0

            def loss(self, model, batch, generator):
                loss, metrics = super().loss(model, batch, generator)
                Flaky.calls += 1
                return (loss * float("nan") if Flaky.calls <= bad else loss), metrics

        return Flaky(cfg)


def test_non_finite_losses_are_skipped_then_abort_with_a_clear_message(shards_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    from clopdit_dist.train.trainer import NonFiniteLossError, train

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    base = [*SMALL, "train.steps=3", "train.max_bad_steps=3"]
    try:
        cfg = load_config(AEStageConfig, None, [*base, f"train.run_dir={tmp_path / 'ok'}", f"data.shards={shards_dir}"])
        train(_FlakyAE.make(cfg, bad=2))  # two NaN batches skipped, then training goes on
        assert [r["step"] for r in log_rows(str(tmp_path / "ok"))] == [1, 2, 3]
        cfg = load_config(AEStageConfig, None, [*base, f"train.run_dir={tmp_path / 'bad'}", f"data.shards={shards_dir}"])
        with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row.*optim.lr"):
            train(_FlakyAE.make(cfg, bad=100))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_generate_from_a_trained_run(tmp_path):
    """The run directory generates on its own: prompts (structured or free), a prompts file,
    an interpolation; integer counts, obs fields, var ids, latents."""
    if 1 not in RUNS:
        pytest.skip("needs the zero1 run of this module")
    import anndata as ad

    from clopdit_dist.cli import main

    out = str(tmp_path / "gen.h5ad")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one per line\nB cells in a lymph node\n")
    main(["generate", "--run", RUNS[1], "--prompt", "cell type: naive B cell; tissue: lymph node", "--prompts-file",
          str(prompts), "--n", "7", "--steps", "3", "--guidance", "1.5", "--seed", "3", "--out", out])
    a = ad.read_h5ad(out)
    assert a.n_obs == 14 and a.n_vars == 200
    assert np.issubdtype(a.X.dtype, np.integer) and a.X.min() >= 0 and a.X.sum() > 0
    assert a.obs["prompt"].nunique() == 2 and (a.obs["guidance"] == 1.5).all() and (a.obs["steps"] == 3).all()
    assert a.obs["cell_type"].iloc[0] == "naive B cell" and a.obs["tissue_general"].iloc[0] == "lymph node"
    assert {"feature_id", "feature_name"} <= set(a.var.columns) and a.obsm["X_latent"].shape == (14, 32)
    again = str(tmp_path / "again.h5ad")
    main(["generate", "--run", RUNS[1], "--prompt", "cell type: naive B cell; tissue: lymph node", "--n", "7",
          "--steps", "3", "--guidance", "1.5", "--seed", "3", "--out", again])
    np.testing.assert_array_equal(ad.read_h5ad(again).X.toarray(), a.X[:7].toarray())  # seeded
    traj = str(tmp_path / "traj.h5ad")
    main(["generate", "--run", RUNS[1], "--interpolate", "naive B cell", "plasma cell", "--points", "3", "--n", "4",
          "--steps", "2", "--sampler", "sde", "--noise", "0.5", "--interval", "0,0.5", "--out", traj])
    t = ad.read_h5ad(traj)
    assert sorted(t.obs["interpolation_alpha"].unique()) == [0.0, 0.5, 1.0] and (t.obs["sampler"] == "sde").all()
    assert (t.obs["guidance_interval"] == "0,0.5").all()


def test_fast_generation_paths_agree(tmp_path):
    """`--compile` gives the eager latents (fp32) and `--precision bf16` stays near them."""
    if 1 not in RUNS:
        pytest.skip("needs the zero1 run of this module")
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.flow import SamplerConfig

    sampler = SamplerConfig(steps=4, guidance=2.0)
    cond = CellGenerator.from_run(RUNS[1]).cond.encode_prompts(["cell type: naive B cell"])
    latents = {}
    for precision, compile in (("fp32", False), ("fp32", True), ("bf16", False)):
        gen = CellGenerator.from_run(RUNS[1], precision=precision, compile=compile)
        assert gen.prior is not None  # the zero1 run starts its flow from the cell-type prior
        source = gen.source_of(gen.library["groups"][:1] * 64)
        latents[precision, compile] = gen.latents(cond, 64, sampler, seed=5, batch_size=32, source=source)
    ref = latents["fp32", False]
    rel = lambda z: float((z - ref).norm() / ref.norm())  # noqa: E731
    assert rel(latents["fp32", True]) < 1e-4
    assert 0 < rel(latents["bf16", False]) < 0.05
    with pytest.raises(ValueError, match="precision"):
        CellGenerator.from_run(RUNS[1], precision="fp16")


def test_a_dit_stage_writes_the_condition_prior_and_generation_keys_each_cell_by_its_fields():
    """The DiT stage's latent statistics hold the per-condition source (flow.prior=condition) beside
    the per-type one; a generator given it starts each cell from its asked condition's Gaussian."""
    if 1 not in RUNS:
        pytest.skip("needs the zero1 run of this module")
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.flow import FlowConfig, load_prior

    gen = CellGenerator.from_run(RUNS[1])
    with open(os.path.join(gen.run.stage_dir("dit"), "latent_stats.json")) as f:
        stats = json.load(f)
    prior = load_prior(stats, FlowConfig(prior="condition"))
    group = max(gen.library["groups"], key=lambda g: g["n"])  # a condition with its own Gaussian
    cell = {f: group[f] for f in prior.fields}
    own = prior.loc_scale([cell])
    assert not torch.equal(own[0], prior.loc_scale([{"cell_type": cell["cell_type"]}])[0])
    gen.prior = prior
    a = gen.generate([", ".join(cell.values())], n=6, sampler=gen.default_sampler, seed=1)
    assert (a.obs["cell_type"] == cell["cell_type"]).all() and a.X.shape[0] == 6
    asked = gen.asked([cell] * 6, gen.library_groups(cell, 6, np.random.default_rng(0)))
    torch.testing.assert_close(gen.source_of(asked)[0], own[0].expand(6, -1))


def test_eval_every_logs_held_out_metrics_during_training(shards_dir, tmp_path, monkeypatch):
    """``train.eval_every=2``: the stage's evaluation runs at steps 2 and 4 (not at the last
    step, which the end-of-run evaluation covers) and is logged as eval/<key>."""
    import torch.distributed as dist

    from clopdit_dist.stages.ae import AEStage
    from clopdit_dist.train.trainer import train

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    try:
        cfg = load_config(AEStageConfig, None, [*SMALL, "train.steps=5", "train.eval_every=2", "data.eval_cells=64",
                                                f"train.run_dir={tmp_path / 'r'}", f"data.shards={shards_dir}"])
        train(AEStage(cfg))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    rows = log_rows(str(tmp_path / "r"))
    evals = [r for r in rows if "eval/gene_mean_pearson" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval/cells"] > 0 for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
