"""The DeepSpeed engine of a run, and the view of it that a :class:`Stage` gets.

A stage's ``loss`` receives a :class:`StageModel`: it behaves as the unwrapped module
(``model.standardize(...)``, ``model.dit``, ``model.parameters()``, ``isinstance(model,
DiTTrainModule)``), but calling it runs ``engine(...)``, not ``engine.module(...)``.

Why not the bare ``engine.module``: ZeRO-3 does install its parameter-gathering hooks on the
module, so a direct call computes the right forward; but in DeepSpeed 0.19 ``engine.forward``
also (a) clears the optimizer's "backward seen" flag, which under ZeRO-3 advances the
micro-step counter that decides whether a micro-batch's gradient partition is copied or
accumulated, and (b) registers hooks on the outputs that run the backward prologue (the
ZeRO gradient-accumulation boundary). Skipping them is silently wrong: with ZeRO-3 and
``gradient_accumulation_steps=2``, a toy model trained through ``engine.module(...)``
diverged from ``engine(...)`` at the second optimizer step (ZeRO-1: identical). bf16 input
casting is the modules' own job in this project (DeepSpeed casts inputs only for fp16), so
it is the same either way.
"""

from __future__ import annotations

import torch

from .config import OptimConfig, TrainConfig
from .distributed import deepspeed_config


class StageModel:
    """The unwrapped module's attributes; calls go through the DeepSpeed engine."""

    __slots__ = ("_engine",)

    def __init__(self, engine):
        object.__setattr__(self, "_engine", engine)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self._engine.module

    @property
    def __class__(self):  # isinstance(view, type(module)) holds, as for the module itself
        return type(self._engine.module)

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine.module, name)

    def __setattr__(self, name, value):
        setattr(self._engine.module, name, value)

    def __repr__(self) -> str:
        return f"StageModel({self._engine.module.__class__.__name__} through DeepSpeed)"


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` (Loshchilov & Hutter, 2017)."""
    import math

    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model: torch.nn.Module, tcfg: TrainConfig, ocfg: OptimConfig, micro_batch: int, world: int):
    """``deepspeed.initialize`` with AdamW (torch's, or DeepSpeed's CPU Adam under offload),
    warmup + cosine LR, and the ZeRO JSON of the run. Returns (engine, scheduler)."""
    import deepspeed

    ds_cfg = deepspeed_config(tcfg, ocfg, micro_batch, world)
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
    return engine, scheduler


def full_state(engine, ema=None) -> dict:
    """Full float32 weights (the EMA weights when EMA is on) on every rank. A collective
    under ZeRO-3: every rank calls it."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero3):
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if ema is not None:
        state.update({k: v.float().cpu() for k, v in ema.gathered(module).items()})
    return state
