"""Config sections every stage shares. A stage config is ``train`` + ``optim`` + ``data`` +
its own ``model`` section (see ``clopdit_dist.train.stages``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    shards: str = "runs/demo/shards"  # directory holding manifest.json
    genes: str = "hvg:2000"  # "all", "hvg:K"
    batch_size: int = 256  # micro-batch per rank
    num_workers: int = 1
    # the training stream: False = resampled (open_clip: each rank its own seeded passes over the
    # shards); True = every cell once per epoch in a world-size-independent order, so an elastic
    # resume neither repeats nor skips a cell (clopdit_dist/data/epoch.py)
    exact: bool = False
    eval_split: str = "val+test"  # held-out studies used for the end-of-run report
    eval_cells: int = 4000  # cap on held-out cells evaluated
    # per-cell loss weight n_type ** -balance over training cell-type counts, mean 1, capped at
    # balance_max_weight (clopdit_dist/data/balance.py); 0 = the plain mean. ae and dit stages only.
    balance: float = 0.0
    balance_max_weight: float = 10.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0


@dataclass
class WandbConfig:
    project: str = "clopdit-dist"
    mode: str = "auto"  # auto: online when a W&B API key is configured, else offline; or online/offline/disabled
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo/run"  # the run directory; the stage writes into run_dir/<stage>
    steps: int = 1000  # optimizer steps
    # at least this many passes over the training cells: steps = max(steps, ceil(min_epochs x training cells /
    # cells per step)), so a preset sized on one atlas keeps its training per cell on a larger one (0: off)
    min_epochs: float = 0.0
    grad_accum: int = 1
    zero_stage: int = 1  # 0, 1, 2 or 3
    offload: bool = False  # ZeRO optimizer offload to CPU (configs/ds/zero{2,3}_offload.json)
    ds_config: str | None = None  # a DeepSpeed JSON; default configs/ds/zero{stage}.json
    precision: str = "fp32"  # fp32 or bf16
    ema_decay: float = 0.0  # 0 disables EMA
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    max_bad_steps: int = 5  # consecutive non-finite losses before aborting
    seed: int = 0
    resume: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class StageConfig:
    """The sections every stage config has; a stage adds its ``model`` section."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
