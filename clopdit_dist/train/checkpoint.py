"""Checkpoints of a stage: DeepSpeed engine state (weights, optimizer, LR schedule), the EMA,
the loader position and the step, under ``RUN/<stage>/checkpoints/step%08d``; the newest
``keep`` are kept. Randomness needs no saving: it is a function of (seed, step, rank)."""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist


class Checkpointer:
    def __init__(self, directory: str, engine, loader, ema, rank: int, keep: int):
        self.dir, self.engine, self.loader, self.ema = directory, engine, loader, ema
        self.rank, self.keep = rank, keep

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint (DeepSpeed writes ``latest`` last)."""
        path = os.path.join(self.dir, "latest")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip()

    def tags(self) -> list[str]:
        return sorted(t for t in os.listdir(self.dir) if t.startswith("step")) if os.path.isdir(self.dir) else []

    def resume(self) -> int | None:
        """Load the newest checkpoint; the step it was taken at, or None if there is none."""
        tag = self.latest()
        if tag is None:
            return None
        _, client = self.engine.load_checkpoint(self.dir, tag=tag, load_module_strict=True)
        self.loader.load_state_dict(client["loader"])
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(os.path.join(self.dir, tag, f"ema_rank{self.rank}.pt"),
                                                weights_only=True))
        return int(client["step"])

    def save(self, step: int) -> str:
        """Every rank calls it (the engine's save is a collective)."""
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(self.dir, tag=tag, client_state={"step": step, "loader": self.loader.state_dict()})
        if self.ema is not None:
            torch.save(self.ema.state_dict(), os.path.join(self.dir, tag, f"ema_rank{self.rank}.pt"))
        dist.barrier()
        if self.rank == 0:  # keep the newest few
            for old in self.tags()[: -self.keep]:
                shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)
        return tag
