"""Exponential moving average of weights, correct under every ZeRO stage.

Under ZeRO-3 a rank holds only its partition of each parameter (``param.ds_tensor``), so
each rank averages its own partition, and export gathers the averaged partitions. (Swapping
the average into the partitions and using ``GatheredParameters`` is not enough: parameters
below ZeRO-3's persistence threshold stay gathered and would export their live values.)
Under ZeRO 0-2 every rank holds full parameters and the average is of those. The average is kept in float32 whatever the
training precision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if _is_partitioned(p) else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        """Warmed-up decay, min(decay, (1 + n) / (10 + n)): without it a short run's average
        keeps a large share of the initial (zero-initialised) weights, e.g. 0.999^1200 = 30%."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local(p).float(), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.updates = int(state.get("updates", 0))
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)

    @torch.no_grad()
    def gathered(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full averaged weights by parameter name. Under ZeRO-3 this is a collective (every
        rank calls it): partition r of a parameter is the r-th contiguous chunk of its
        flattened, padded values, so the partitions are gathered and concatenated."""
        names = {id(p): n for n, p in module.named_parameters()}
        out = {}
        for s, p in zip(self.shadow, self.params):
            if _is_partitioned(p):
                parts = [torch.empty_like(s) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, s)
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            else:
                full = s
            out[names[id(p)]] = full.clone()
        return out
