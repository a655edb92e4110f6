"""What the loop reports: per-step rows (loss all-reduced over ranks, LR, step time, cells/s,
grad norm, MFU on known GPUs) through :class:`~.tracking.Tracker` (rank 0: W&B, ``log.jsonl``,
progress bar)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from .tracking import Tracker, peak_flops


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsLogger:
    def __init__(self, cfg, stage_name: str, stage_dir: str, rank: int, world: int, device: torch.device,
                 start_step: int, flops_per_cell: float | None):
        tcfg = cfg.train
        self.world, self.log_every, self.total = world, tcfg.log_every, tcfg.steps
        self.tracker = Tracker(rank, stage_dir, f"{os.path.basename(os.path.abspath(tcfg.run_dir))}/{stage_name}",
                               flat(asdict(cfg)), tcfg.wandb, tcfg.steps, start_step)
        self.peak, self.flops = peak_flops(device), flops_per_cell
        self.t_last = time.perf_counter()

    def step(self, step: int, losses: list[torch.Tensor], metrics: dict, cells: int, engine, scheduler) -> None:
        """Called by every rank after each optimizer step (the loss mean is a collective)."""
        self.tracker.advance()
        if not (step % self.log_every == 0 or step == self.total):
            return
        loss_mean = torch.stack(losses).mean()
        dist.all_reduce(loss_mean)
        now = time.perf_counter()
        dt = (now - self.t_last) / max(1, step % self.log_every or self.log_every)
        self.t_last = now
        cells_per_s = cells * self.world / dt
        grad_norm = engine.get_global_grad_norm()
        row = {"loss": loss_mean / self.world, "lr": scheduler.get_last_lr()[0], "step_time_s": dt,
               "cells_per_s": cells_per_s, **metrics}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.peak and self.flops:
            row["mfu"] = self.flops * cells_per_s / (self.peak * self.world)
        self.tracker.log(step, row)

    def log(self, step: int, row: dict) -> None:
        self.tracker.log(step, row, progress=False)

    def summary(self, results: dict) -> None:
        self.tracker.summary(results)

    def close(self) -> None:
        self.tracker.close()
