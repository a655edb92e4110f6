"""Checkpoints of a stage: DeepSpeed engine state (weights, optimizer, LR schedule), the EMA,
the loader position and the step, under ``RUN/<stage>/checkpoints/step%08d``; the newest
``keep`` are kept. Randomness needs no saving: it is a function of (seed, step, rank).

Elastic resume. A checkpoint records the world size it was taken with (``meta.json``). When a
run resumes with another world size (2 -> 1, 1 -> 2, 2 -> 1 -> 2 ...), rank 0 converts the
checkpoint once to a DeepSpeed universal checkpoint (``deepspeed.checkpoint.ds_to_universal``,
into ``<tag>_universal``) and every rank loads it with ``checkpoint.load_universal``: weights,
Adam moments and step, LR schedule, re-partitioned for the new world. The EMA is re-sliced
(ZeRO-3 partitions) or taken from rank 0 (ZeRO 0-2: replicas). The loader position:

- same world size: exact (the batches are those of the uninterrupted run);
- another world size, ``data.exact=true``: the epoch's cells not yet drawn by any old rank
  are split among the new ranks; no cell is repeated or skipped (``clopdit_dist/data/epoch.py``);
- another world size, the default resampled stream: the epoch and the number of batches
  consumed in it carry over, rounded up to whole batches of the new world. Each rank draws
  its own seeded stream over all shards (open_clip), so cell-level "no repeat, no skip" does
  not hold across ranks even without a resume; the rest of the epoch comes from the new
  world's streams.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

TAG = "step{:08d}"


class Checkpointer:
    def __init__(self, directory: str, engine, loader, ema, rank: int, keep: int):
        self.dir, self.engine, self.loader, self.ema = directory, engine, loader, ema
        self.rank, self.keep = rank, keep
        self.world = dist.get_world_size()

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint (``save`` writes ``latest`` after every rank's files)."""
        path = os.path.join(self.dir, "latest")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip()

    def tags(self) -> list[str]:
        if not os.path.isdir(self.dir):
            return []
        return sorted(t for t in os.listdir(self.dir) if t.startswith("step") and not t.endswith("_universal"))

    def meta(self, tag: str) -> dict | None:
        path = os.path.join(self.dir, tag, "meta.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def resume(self) -> int | None:
        """Load the newest checkpoint; the step it was taken at, or None if there is none."""
        tag = self.latest()
        if tag is None:
            return None
        meta = self.meta(tag)
        if meta is None or meta["world_size"] == self.world:
            _, client = self.engine.load_checkpoint(self.dir, tag=tag, load_module_strict=True)
            self.loader.load_state_dict(client["loader"])
            if self.ema is not None:
                self.ema.load_state_dict(torch.load(os.path.join(self.dir, tag, f"ema_rank{self.rank}.pt"),
                                                    weights_only=True))
            return int(client["step"])
        return self._resume_elastic(tag, meta)

    def _resume_elastic(self, tag: str, meta: dict) -> int:
        old = meta["world_size"]
        universal = f"{tag}_universal"
        if self.rank == 0 and not os.path.exists(os.path.join(self.dir, universal, "done")):
            shutil.rmtree(os.path.join(self.dir, universal), ignore_errors=True)
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   os.path.join(self.dir, tag), "--output_folder", os.path.join(self.dir, universal),
                                   "--inject_missing_state"],  # checkpoints saved before meta.json
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {tag} ({old} ranks) to a universal checkpoint failed:\n"
                                   f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
            open(os.path.join(self.dir, universal, "done"), "w").close()
        dist.barrier()
        cfg = self.engine._config
        cfg.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(self.dir, tag=universal, load_module_strict=True)
        finally:
            cfg.load_universal_checkpoint = False
        where = self.loader.load_state_dict(meta["loader"])
        if self.ema is not None:
            self._load_ema_resliced(tag, old)
        if self.rank == 0:
            print(f"elastic resume: {tag} from {old} to {self.world} ranks (universal checkpoint {universal}); "
                  f"loader: {where}", flush=True)
        return int(meta["step"])

    def _load_ema_resliced(self, tag: str, old: int) -> None:
        states = [torch.load(os.path.join(self.dir, tag, f"ema_rank{r}.pt"), weights_only=True) for r in range(old)]
        shadow = []
        for i, p in enumerate(self.ema.params):
            if hasattr(p, "ds_tensor"):  # ZeRO-3: rank r holds chunk r of the flattened, padded parameter
                full = torch.cat([s["shadow"][i].flatten() for s in states])[: p.ds_numel]
                n = p.ds_tensor.numel()
                padded = torch.zeros(n * self.world, dtype=full.dtype)
                padded[: full.numel()] = full
                shadow.append(padded[self.rank * n:(self.rank + 1) * n].view_as(self.ema.shadow[i]))
            else:  # full replicas: every rank saved the same average
                shadow.append(states[0]["shadow"][i])
        self.ema.load_state_dict({"updates": states[0]["updates"], "shadow": shadow})

    def save(self, step: int) -> str:
        """Every rank calls it (the engine's save is a collective)."""
        tag = TAG.format(step)
        loader = self.loader.state_dict()
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        # ds_to_universal requires this entry; no tensor or pipeline parallelism here, so the
        # version is all it needs
        universal = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        # ``latest`` is written by us, last, after a barrier: DeepSpeed's own ``save_latest``
        # has rank 0 write it as soon as rank 0's files are done, before the other ranks'
        # optimizer shards (and our EMA and meta files) are; a rank killed in that window
        # would leave ``latest`` naming an incomplete tag.
        self.engine.save_checkpoint(self.dir, tag=tag, save_latest=False,
                                    client_state={"step": step, "loader": loader, UNIVERSAL_CHECKPOINT_INFO: universal})
        if self.ema is not None:
            torch.save(self.ema.state_dict(), os.path.join(self.dir, tag, f"ema_rank{self.rank}.pt"))
        if self.rank == 0:
            with open(os.path.join(self.dir, tag, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": self.world, "loader": loader}, f)
        dist.barrier()  # every rank's files of the tag are written
        if self.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.dir, "latest"))  # atomic: the old tag or the new one
        dist.barrier()
        if self.rank == 0:  # keep the newest few
            for old in self.tags()[: -self.keep]:
                shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)
                shutil.rmtree(os.path.join(self.dir, f"{old}_universal"), ignore_errors=True)
        return tag
