"""Hyper-parameter sweeps from W&B sweep YAMLs (``configs/sweeps/*.yaml``), online or offline.

The YAML is the standard W&B format. Its ``command`` runs this module with the trial's
parameters as dotted overrides (``${args_no_hyphens}``: ``optim.lr=3e-4 model.depth=6``),
which reach the typed stage config unchanged. The objective is ``metric.name``, a dotted
key of the stage's held-out metrics file ``RUN/<stage>/metrics.json`` (written by the
end-of-training evaluation), e.g. ``model_canonical.identity_cell_type`` (dit) or
``zero_shot_canonical.accuracy`` (clop); the key lives in the YAML only. Every trial logs
all numeric metrics of that file, flattened to dotted keys, to its W&B run's summary, so the
W&B sweep controller finds the objective there too.

Three ways to run a sweep:

- offline, here: ``clopdit sweep --config configs/sweeps/dit.yaml --trials 8 --shards S
  --run-root R --base-run RUN``: the ``sweeps`` package (W&B's own search code; installed
  with ``--no-deps`` by scripts/install.sh because it pins numpy<2) proposes each trial from
  the finished ones (``sweeps.next_run(config, runs)``), the trial trains, its W&B run is
  logged (offline unless W&B is configured), and the best trial is printed;
- ``wandb agent`` running the YAML's ``command`` (one process per trial);
- a SLURM job per agent (``launchers/slurm/sweep_agent.sbatch``): every rank runs
  ``python -m clopdit_dist.train.sweep --agent ENTITY/PROJECT/ID``; rank 0 takes a trial from
  the W&B controller and broadcasts its parameters to the other ranks; all ranks train it.

In every mode rank 0 proposes and broadcasts (``torch.distributed.broadcast_object_list``),
so a trial trains on as many ranks as the job has. Trials of a stage that builds on earlier
stages (dit needs ae and clop, clop needs ae) link those stages from ``--base-run``; each
trial gets its own run directory ``RUN_ROOT/trial-NNN`` (or the W&B run id).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import time

import yaml

from ..errors import ConfigError

STAGES = {"ae": ("clopdit_dist.stages.ae", "AEStage", "AEStageConfig"),
          "clop": ("clopdit_dist.stages.clop", "ClopStage", "ClopStageConfig"),
          "dit": ("clopdit_dist.stages.dit", "DiTStage", "DiTStageConfig")}
NEEDS = {"ae": (), "clop": ("ae",), "dit": ("ae", "clop")}


def load_sweep(path: str) -> dict:
    try:
        with open(path) as f:
            sweep = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"sweep config {path!r}: {exc.strerror}; give a W&B sweep YAML such as "
                          "configs/sweeps/dit.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep config {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(sweep, dict) or "metric" not in sweep or "parameters" not in sweep:
        raise ConfigError(f"sweep config {path!r} is no W&B sweep (it needs 'metric' and 'parameters')")
    return sweep


def _command_arg(sweep: dict, flag: str) -> str | None:
    cmd = [str(c) for c in sweep.get("command", [])]
    return cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else None


def sweep_stage(sweep: dict, path: str) -> str:
    """The stage: ``--stage`` in the YAML's command, else the YAML's file name."""
    stage = _command_arg(sweep, "--stage") or os.path.splitext(os.path.basename(path))[0]
    if stage not in STAGES:
        raise ValueError(f"{path}: cannot tell the stage (add '--stage dit' to its command); got {stage!r}")
    return stage


def dotted(d: dict, key: str):
    """``d['a']['b']`` for ``'a.b'`` (or ``d['a.b']`` if that key exists as written)."""
    if key in d:
        return d[key]
    node = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"metric {key!r} is not in the metrics file (keys: {sorted(d)})")
        node = node[part]
    return node


def flat_numbers(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def trial_overrides(params: dict) -> list[str]:
    """{'optim.lr': 3e-4} -> ['optim.lr=0.0003'] (YAML values, as ${args_no_hyphens} passes them)."""
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in sorted(params.items())]


def prepare_run(run_dir: str, stage: str, base_run: str | None) -> None:
    """A trial's run directory: run.json, manifest.json and the earlier stages it builds on,
    symlinked from ``base_run`` (read only: a trial writes its own stage only)."""
    needs = NEEDS[stage]
    os.makedirs(run_dir, exist_ok=True)
    if not needs:
        return
    if base_run is None:
        raise SystemExit(f"a {stage} sweep needs --base-run, a run directory with trained {', '.join(needs)}")
    for name in ("run.json", "manifest.json"):
        if not os.path.exists(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(base_run, name), os.path.join(run_dir, name))
    for s in needs:
        link = os.path.join(run_dir, s)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(base_run, s)), link)


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_trial(stage: str, params: dict, run_dir: str, shards: str, base_config: str | None,
                base_run: str | None, overrides: list[str]) -> dict:
    """Every rank: train one trial; returns the stage's metrics (rank 0; {} elsewhere)."""
    import torch.distributed as dist

    from ..config import load_config
    from .trainer import train

    if dist.get_rank() == 0:
        prepare_run(run_dir, stage, base_run)
    dist.barrier()
    module, stage_cls, cfg_cls = STAGES[stage]
    mod = importlib.import_module(module)
    cfg = load_config(getattr(mod, cfg_cls), base_config, [
        *overrides, *trial_overrides(params), f"data.shards={shards}", f"train.run_dir={run_dir}",
        "train.wandb.mode=disabled"])  # the sweep owns the trial's W&B run
    return train(getattr(mod, stage_cls)(cfg))


def _wandb_trial(mode: str, name: str, group: str, params: dict, run_dir: str, stage: str, metrics: dict,
                 metric: str):
    """Rank 0: one W&B run per trial: its parameters, its loss curve, its metrics (dotted)."""
    import wandb

    run = wandb.init(project="clopdit-dist-sweeps", name=name, group=group, config=params, mode=mode,
                     dir=run_dir, reinit="finish_previous")
    log = os.path.join(run_dir, stage, "log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                row = json.loads(line)
                run.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=int(row["step"]))
    for k, v in flat_numbers(metrics).items():
        run.summary[k] = v
    run.summary["objective"] = float(dotted(metrics, metric))
    run.finish()


def run_sweep(config: str, trials: int, shards: str, run_root: str, base_config: str | None = None,
              base_run: str | None = None, overrides: list[str] | None = None, wandb_mode: str | None = None) -> dict:
    """Offline sweep: rank 0 proposes each trial with ``sweeps.next_run`` and broadcasts it;
    all ranks train it. Returns (and prints, rank 0) the best trial."""
    import torch.distributed as dist

    from .distributed import init_distributed
    from .tracking import wandb_mode as resolve_mode

    sweep = load_sweep(config)  # a wrong path is refused before any process group starts
    rank, _, _ = init_distributed()
    stage = sweep_stage(sweep, config)
    base_config = base_config or _command_arg(sweep, "--config")
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")
    mode = resolve_mode(wandb_mode or os.environ.get("WANDB_MODE", "auto"))
    group = f"{os.path.basename(os.path.abspath(run_root))}-{stage}"
    runs, history = [], []
    for i in range(trials):
        proposal = None
        if rank == 0:
            import sweeps

            suggestion = sweeps.next_run(sweep, runs)
            proposal = None if suggestion is None else {k: v["value"] for k, v in suggestion.config.items()}
        proposal = _broadcast(proposal)
        if proposal is None:  # a grid is exhausted
            break
        name = f"trial-{i:03d}"
        run_dir = os.path.join(run_root, name)
        if rank == 0:
            print(f"[sweep] {name}: {' '.join(trial_overrides(proposal))}", flush=True)
        t0 = time.perf_counter()
        metrics = train_trial(stage, proposal, run_dir, shards, base_config, base_run, list(overrides or []))
        if rank == 0:
            value = float(dotted(metrics, metric))
            if mode != "disabled":
                _wandb_trial(mode, name, group, proposal, run_dir, stage, metrics, metric)
            runs.append(sweeps.SweepRun(name=name, state="finished", config={k: {"value": v} for k, v in proposal.items()},
                                        summary_metrics={metric: value}, history=[{metric: value}]))
            history.append({"trial": name, "params": proposal, metric: value, "run_dir": run_dir,
                            "seconds": round(time.perf_counter() - t0, 1)})
            with open(os.path.join(run_root, "sweep.jsonl"), "a") as f:
                f.write(json.dumps(history[-1]) + "\n")
    best = {}
    if rank == 0 and history:
        finite = [h for h in history if math.isfinite(h[metric])] or history
        best = (max if goal == "maximize" else min)(finite, key=lambda h: h[metric])
        print(f"[sweep] best of {len(history)} trials ({goal} {metric}): {best['trial']} {metric}={best[metric]:.6g} "
              f"{' '.join(trial_overrides(best['params']))} -> {best['run_dir']}", flush=True)
    dist.barrier()
    return best


def _agent(sweep_id: str, count: int, sweep_path: str, shards: str, run_root: str, base_config: str | None,
           base_run: str | None, overrides: list[str]) -> None:
    """SLURM agent: rank 0 takes ``count`` trials from the W&B controller (``wandb.agent``),
    broadcasting each trial's parameters; every rank trains it. Needs W&B online."""
    import torch.distributed as dist

    from .distributed import init_distributed

    rank, _, _ = init_distributed()
    sweep = load_sweep(sweep_path)
    stage = sweep_stage(sweep, sweep_path)
    base_config = base_config or _command_arg(sweep, "--config")
    metric = sweep["metric"]["name"]

    def one_trial():  # rank 0, inside the agent's W&B run
        import wandb

        run = wandb.init()
        params = dict(run.config)
        run_dir = os.path.join(run_root, run.id)
        _broadcast((params, run_dir))
        metrics = train_trial(stage, params, run_dir, shards, base_config, base_run, overrides)
        for k, v in flat_numbers(metrics).items():
            run.summary[k] = v
        run.summary["objective"] = float(dotted(metrics, metric))
        run.finish()

    if rank == 0:
        import wandb

        wandb.agent(sweep_id, function=one_trial, count=count)
        _broadcast(None)
    else:
        while (msg := _broadcast(None)) is not None:
            params, run_dir = msg
            train_trial(stage, params, run_dir, shards, base_config, base_run, overrides)
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    """The program of the sweep YAMLs' ``command``: one trial with the given overrides (what
    ``wandb agent`` runs), or ``--agent ID`` (SLURM), or ``--trials N`` (offline)."""
    p = argparse.ArgumentParser(prog="python -m clopdit_dist.train.sweep")
    p.add_argument("--sweep", required=True, help="the sweep YAML (for its metric and stage)")
    p.add_argument("--stage", default=None)
    p.add_argument("--config", default=None, help="stage YAML")
    p.add_argument("--shards", required=True)
    p.add_argument("--run-root", required=True)
    p.add_argument("--base-run", default=None)
    p.add_argument("--agent", default=None, metavar="ENTITY/PROJECT/SWEEP_ID")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--trials", type=int, default=None, help="offline: propose and run N trials")
    args, rest = p.parse_known_args(argv)
    overrides = [r for r in rest if "=" in r and not r.startswith("-")]
    if args.agent:
        _agent(args.agent, args.count, args.sweep, args.shards, args.run_root, args.config, args.base_run, overrides)
    elif args.trials:
        run_sweep(args.sweep, args.trials, args.shards, args.run_root, args.config, args.base_run, overrides)
    else:  # one trial launched by `wandb agent`: the overrides are the trial's parameters
        import wandb

        from .distributed import init_distributed

        rank, _, _ = init_distributed()
        sweep = load_sweep(args.sweep)
        stage = args.stage or sweep_stage(sweep, args.sweep)
        params = dict(o.split("=", 1) for o in overrides)
        run = wandb.init(config=params) if rank == 0 else None
        run_dir = os.path.join(args.run_root, run.id if run is not None else "trial")
        run_dir = _broadcast(run_dir)
        metrics = train_trial(stage, {}, run_dir, args.shards, args.config, args.base_run, overrides)
        if run is not None:
            for k, v in flat_numbers(metrics).items():
                run.summary[k] = v
            run.summary["objective"] = float(dotted(metrics, sweep["metric"]["name"]))
            run.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
