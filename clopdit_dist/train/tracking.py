"""Rank-0 logging: a JSON-lines log in the run directory, a progress bar, and W&B."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import torch

# Dense bf16 peak FLOP/s for MFU (no sparsity), by device-name substring.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
    return "online" if has_key else "offline"


class Tracker:
    """Does nothing on ranks other than 0."""

    def __init__(self, rank: int, stage_dir: str, run_name: str, config: dict, wandb_cfg, total_steps: int,
                 start_step: int):
        self.active = rank == 0
        self.log_path = os.path.join(stage_dir, "log.jsonl")
        self.run = None
        self.bar = None
        if not self.active:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0)
        mode = wandb_mode(wandb_cfg.mode)
        if mode != "disabled":
            import wandb

            id_file = os.path.join(stage_dir, "wandb_id")
            run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=run_name, id=run_id,
                                  resume="allow", dir=stage_dir, mode=mode, config=config, tags=list(wandb_cfg.tags))

    def log(self, step: int, metrics: dict, progress: bool = True) -> None:
        if not self.active:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _num(v) for k, v in metrics.items()}}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)
        if progress and self.bar is not None:
            self.bar.set_postfix({k: f"{_num(v):.4g}" for k, v in metrics.items() if k in ("loss", "lr")})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.run.summary[k] = v

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()


def _num(v):
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)
