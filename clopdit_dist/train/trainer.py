"""The training loop. Every stage (autoencoder, CLOP, DiT) runs through :func:`train`.

A stage supplies a model, a loss and an evaluation (see :class:`Stage`); this file owns the
rest, once: DeepSpeed setup (ZeRO 0-3, bf16/fp32, gradient accumulation), warmup + cosine
LR, gradient clipping, EMA, checkpoints (every N steps, at the end, on SIGTERM), exact
resume (step, optimizer, schedule, loader position; all randomness is a function of
(seed, step, rank)), a non-finite-loss guard, rank-0 logging to W&B and a progress bar, and
the export of inference weights as safetensors.

    deepspeed --num_gpus 2 launchers/train_ae.py --config configs/ae.yaml train.steps=500
    torchrun --nproc_per_node 2 launchers/train_ae.py --config configs/ae.yaml
    python launchers/train_ae.py --config configs/ae.yaml          # a world of one
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..config import save_config
from ..data.loader import CellLoader
from ..run import RunDir
from .distributed import deepspeed_config, init_distributed
from .ema import EMA
from .stage import Stage
from .tracking import Tracker, peak_flops


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` (Loshchilov & Hutter, 2017)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


def train(stage: Stage) -> dict:
    """Train ``stage`` to ``cfg.train.steps``, resuming from its latest checkpoint."""
    import deepspeed

    cfg = stage.cfg
    tcfg, ocfg = cfg.train, cfg.optim
    rank, world, device = init_distributed()
    run = RunDir(tcfg.run_dir)
    stage_dir = run.stage_dir(stage.name)
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    if rank == 0:
        run.init(cfg.data.shards)
        os.makedirs(stage_dir, exist_ok=True)
    dist.barrier()

    from ..data.loader import LoaderConfig

    loader = CellLoader(cfg.data.shards, LoaderConfig(
        split="train", genes=stage.genes(run), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        seed=tcfg.seed, fields=stage.fields()), rank=rank, world_size=world)
    stage.setup(run, loader, device)  # may fill in config values from the data (e.g. gene count)
    if rank == 0:
        save_config(cfg, os.path.join(stage_dir, "config.yaml"))
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = stage.build_model()

    ds_cfg = deepspeed_config(tcfg, ocfg, cfg.data.batch_size, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_lambda(s, ocfg.warmup_steps, tcfg.steps, ocfg.min_lr_ratio))
    if tcfg.offload:  # ZeRO-Offload runs DeepSpeed's own CPU Adam
        ds_cfg["optimizer"] = {"type": "AdamW", "params": {"lr": ocfg.lr, "betas": list(ocfg.betas),
                                                           "weight_decay": ocfg.weight_decay}}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(trainable, lr=ocfg.lr, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable,
                                                   lr_scheduler=schedule, config=ds_cfg)
    ema = EMA(engine.module, tcfg.ema_decay) if tcfg.ema_decay > 0 else None

    step = 0
    if tcfg.resume and os.path.exists(os.path.join(ckpt_dir, "latest")):
        _, client = engine.load_checkpoint(ckpt_dir, load_module_strict=True)
        step = int(client["step"])
        loader.load_state_dict(client["loader"])
        if ema is not None:
            tag = open(os.path.join(ckpt_dir, "latest")).read().strip()
            ema.load_state_dict(torch.load(os.path.join(ckpt_dir, tag, f"ema_rank{rank}.pt"), weights_only=True))
        if rank == 0:
            print(f"[{stage.name}] resumed from {ckpt_dir} at step {step}", flush=True)

    stop = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    def save(step: int) -> None:
        tag = f"step{step:08d}"
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step, "loader": loader.state_dict()})
        if ema is not None:
            torch.save(ema.state_dict(), os.path.join(ckpt_dir, tag, f"ema_rank{rank}.pt"))
        dist.barrier()
        if rank == 0:  # keep the newest few
            tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step"))
            for old in tags[: -tcfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)

    tracker = Tracker(rank, stage_dir, f"{os.path.basename(os.path.abspath(tcfg.run_dir))}/{stage.name}",
                      _flat(asdict(cfg)), tcfg.wandb, tcfg.steps, step)
    peak = peak_flops(device)
    flops = stage.flops_per_cell(engine.module)
    batches = iter(loader)
    bad = 0
    t_last = time.perf_counter()
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
            loss, metrics = stage.loss(engine, batch, gen)
            if _agree(not torch.isfinite(loss).item(), device):
                bad += 1
                if rank == 0:
                    print(f"[{stage.name}] step {step}: non-finite loss, batch skipped ({bad} in a row)", flush=True)
                if bad >= tcfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{stage.name}: {bad} non-finite losses in a row at step {step}. Lower optim.lr "
                        f"(now {ocfg.lr}), use train.precision=fp32, or check the data; the last checkpoint is "
                        f"in {ckpt_dir}.")
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
        tracker.advance()

        if step % tcfg.log_every == 0 or step == tcfg.steps:
            loss_mean = torch.stack(losses).mean()
            dist.all_reduce(loss_mean)
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step % tcfg.log_every or tcfg.log_every)
            t_last = now
            cells_per_s = cells * world / dt
            grad_norm = engine.get_global_grad_norm()
            row = {"loss": loss_mean / world, "lr": scheduler.get_last_lr()[0], "step_time_s": dt,
                   "cells_per_s": cells_per_s, **metrics_acc}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if peak and flops:
                row["mfu"] = flops * cells_per_s / (peak * world)
            tracker.log(step, row)
        if _agree(stop["flag"], device):  # every rank joins the collective, whatever its flag
            save(step)
            tracker.close()
            signal.signal(signal.SIGTERM, previous)
            if rank == 0:
                print(f"[{stage.name}] SIGTERM: checkpoint saved at step {step}; rerun the same command to resume",
                      flush=True)
            raise SystemExit(143)
        if step % tcfg.ckpt_every == 0 and step < tcfg.steps:
            save(step)

    save(step)
    signal.signal(signal.SIGTERM, previous)
    state = _gather_state(engine, ema)
    results = {}
    if rank == 0:
        stage.export(state, run)
        eval_model = stage.build_model().to(device)
        eval_model.load_state_dict(state)
        eval_model.eval()
        results = stage.evaluate(eval_model, run, device)
        run.save_metrics(stage.name, results)
        tracker.summary(results)
    tracker.close()
    dist.barrier()
    return results


def _gather_state(engine, ema: EMA | None) -> dict:
    """Full float32 weights (the EMA weights when EMA is on) on every rank."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero3):
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if ema is not None:
        state.update({k: v.float().cpu() for k, v in ema.gathered(module).items()})
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
