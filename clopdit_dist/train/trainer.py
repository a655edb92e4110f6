"""The training loop. Every stage (autoencoder, CLOP, DiT) runs through :func:`train`.

A stage supplies a model, a loss and an evaluation (:class:`~.stage.Stage`); the pieces
around the loop each live in their own file:

- ``engine.py``: DeepSpeed setup (ZeRO 0-3, bf16/fp32, gradient accumulation, warmup +
  cosine LR, clipping) and :class:`~.engine.StageModel`, the unwrapped-module view a stage's
  ``loss`` receives (calls still go through the engine);
- ``checkpoint.py``: :class:`~.checkpoint.Checkpointer` (save with a tag, keep the newest N,
  resume engine + EMA + loader position + step);
- ``metrics.py``: :class:`~.metrics.MetricsLogger` (rank-0 W&B, ``log.jsonl``, progress bar);
- ``ema.py``: the weight average, correct under ZeRO-3.

This file is the loop: micro-steps with the non-finite-loss guard, EMA, logging, periodic
evaluation (``train.eval_every``), checkpoints (every N steps, at the end, on SIGTERM), and
the export of inference weights as safetensors. All randomness is a function of (seed, step,
rank), so a resumed run draws what the uninterrupted run drew.

    deepspeed --num_gpus 2 launchers/train_ae.py --config configs/ae.yaml train.steps=500
    torchrun --nproc_per_node 2 launchers/train_ae.py --config configs/ae.yaml
    python launchers/train_ae.py --config configs/ae.yaml          # a world of one
"""

from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist

from ..config import save_config
from ..data.loader import CellLoader, LoaderConfig
from ..run import RunDir
from .checkpoint import Checkpointer
from .distributed import init_distributed
from .ema import EMA
from .engine import StageModel, build_engine, full_state, lr_lambda  # noqa: F401  (lr_lambda: public here too)
from .metrics import MetricsLogger, flat
from .stage import Stage


class NonFiniteLossError(RuntimeError):
    pass


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The randomness of one micro-step, a function of (seed, step, rank) only, so a resumed
    run draws what the uninterrupted run drew. Global RNGs (dropout) are reseeded too."""
    s = (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)
    torch.manual_seed(s)
    g = torch.Generator(device=device)
    g.manual_seed(s)
    return g


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _evaluate(stage: Stage, state: dict, run: RunDir, device) -> dict:
    """The stage's held-out evaluation (rank 0) of the given full weights."""
    model = stage.build_model().to(device)
    model.load_state_dict(state)
    model.eval()
    return stage.evaluate(model, run, device)


def steps_for_epochs(tcfg, n_train: int, cells_per_step: int) -> int:
    """``tcfg.steps``, or more where ``tcfg.min_epochs`` passes over ``n_train`` cells need more (the
    resolved number is what the stage's saved config records, so a resumed run keeps it)."""
    return max(tcfg.steps, math.ceil(tcfg.min_epochs * n_train / cells_per_step)) if tcfg.min_epochs > 0 \
        else tcfg.steps


def train(stage: Stage) -> dict:
    """Train ``stage`` to ``cfg.train.steps``, resuming from its latest checkpoint."""
    cfg = stage.cfg
    tcfg, ocfg = cfg.train, cfg.optim
    rank, world, device = init_distributed()
    run = RunDir(tcfg.run_dir)
    stage_dir = run.stage_dir(stage.name)
    if rank == 0:
        run.init(cfg.data.shards)
        os.makedirs(stage_dir, exist_ok=True)
    dist.barrier()

    loader = CellLoader(cfg.data.shards, LoaderConfig(
        split="train", genes=stage.genes(run), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        seed=tcfg.seed, fields=stage.fields(), exact=cfg.data.exact), rank=rank, world_size=world)
    stage.setup(run, loader, device)  # may fill in config values from the data (e.g. gene count)
    tcfg.steps = steps_for_epochs(tcfg, loader.manifest.n_cells("train"), cfg.data.batch_size * world * tcfg.grad_accum)
    if rank == 0:
        save_config(cfg, os.path.join(stage_dir, "config.yaml"))
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    engine, scheduler = build_engine(stage.build_model(), tcfg, ocfg, cfg.data.batch_size, world)
    model = StageModel(engine)
    ema = EMA(engine.module, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), engine, loader, ema, rank, tcfg.keep_checkpoints)

    step = 0
    if tcfg.resume:
        resumed = ckpt.resume()
        if resumed is not None:
            step = resumed
            if rank == 0:
                print(f"[{stage.name}] resumed from {ckpt.dir} at step {step}", flush=True)

    stop = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    logger = MetricsLogger(cfg, stage.name, stage_dir, rank, world, device, step, stage.flops_per_cell(engine.module))
    batches = iter(loader)
    bad = 0
    while step < tcfg.steps:
        engine.train()
        losses, metrics_acc, cells = [], {}, 0
        micro = 0
        while micro < tcfg.grad_accum:
            try:
                batch = next(batches)
            except StopIteration:  # epoch boundary: the loader moves to the next epoch
                batches = iter(loader)
                batch = next(batches)
            gen = _step_generator(tcfg.seed, step * tcfg.grad_accum + micro, rank, device)
            loss, metrics = stage.loss(model, batch, gen)
            if _agree(not torch.isfinite(loss).item(), device):
                bad += 1
                if rank == 0:
                    print(f"[{stage.name}] step {step}: non-finite loss, batch skipped ({bad} in a row)", flush=True)
                if bad >= tcfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{stage.name}: {bad} non-finite losses in a row at step {step}. Lower optim.lr "
                        f"(now {ocfg.lr}), use train.precision=fp32, or check the data; the last checkpoint is "
                        f"in {ckpt.dir}.")
                continue
            bad = 0
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            for k, v in metrics.items():
                metrics_acc[k] = metrics_acc.get(k, 0.0) + float(v) / tcfg.grad_accum
            cells += batch["counts"].shape[0]
            micro += 1
        step += 1
        if ema is not None:
            ema.update()
        logger.step(step, losses, metrics_acc, cells, engine, scheduler)

        if tcfg.eval_every > 0 and step % tcfg.eval_every == 0 and step < tcfg.steps:
            state = full_state(engine, ema)  # a collective under ZeRO-3
            if rank == 0:
                results = _evaluate(stage, state, run, device)
                logger.log(step, {f"eval/{k}": v for k, v in flat(results).items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
            dist.barrier()
        if _agree(stop["flag"], device):  # every rank joins the collective, whatever its flag
            ckpt.save(step)
            logger.close()
            signal.signal(signal.SIGTERM, previous)
            if rank == 0:
                print(f"[{stage.name}] SIGTERM: checkpoint saved at step {step}; rerun the same command to resume",
                      flush=True)
            raise SystemExit(143)
        if step % tcfg.ckpt_every == 0 and step < tcfg.steps:
            ckpt.save(step)

    ckpt.save(step)
    signal.signal(signal.SIGTERM, previous)
    state = full_state(engine, ema)
    results = {}
    if rank == 0:
        stage.export(state, run)
        results = _evaluate(stage, state, run, device)
        run.save_metrics(stage.name, results)
        logger.summary(results)
    logger.close()
    dist.barrier()
    return results
