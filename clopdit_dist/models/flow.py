"""Flow matching on autoencoder latents, and the samplers that generate with guidance.

Path and objective (Lipman et al., 2023; Liu et al., 2023, rectified flow):
    x_t = t * x_1 + (1 - t) * x_0,   x_0 ~ N(0, I) noise, x_1 a (standardised) cell latent,
    v*  = x_1 - x_0,                 loss = || v_theta(x_t, t, c) - v* ||^2,
with t ~ logit-normal(m, s) (Esser et al., 2024, SD3), which spends the training signal on
the middle of the path.

Guidance: classifier-free (Ho & Salimans, 2022): v = v_null + w (v_c - v_null), optionally
only for t inside a guidance interval (Kynkäänniemi et al., 2024), and compositional over
condition fields as scLDM does: v = v_null + sum_k w_k (v_k - v_null), where v_k keeps only
field k.

Samplers integrate t from 0 (noise) to 1 (data): Euler, Heun, midpoint, and a stochastic
Euler-Maruyama variant with the same marginals,
    dx = [v - (eta / 2) (x - t v)] dt + sqrt(eta (1 - t)) dW,
obtained from the score of the linear path, s = -(x - t v) / (1 - t), with diffusion
g(t)^2 = eta (1 - t); ``eta`` = 0 is the ODE, larger values add diversity (the CLOP-DiT
paper's generated cells were too alike: diversity ratio 0.51).

With a Gaussian source x_0 = loc + scale * eps (below), the SDE runs in the whitened coordinates
(x - loc) / scale, where the path is the one above: dx = [v - (eta / 2)(x - loc - t v)] dt
+ scale sqrt(eta (1 - t)) dW.

Source: x_0 ~ N(0, I), or (``FlowConfig.prior = "cell_type"``) the cell type's own diagonal
Gaussian in the standardised latent, x_0 = mu_type + sigma_type * eps: PriorGrad's
data-dependent prior (Lee et al., ICLR 2022); flow matching admits any source (Tong et al.,
TMLR 2024), and from there the flow only has to carry a cell within its type's region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError


@dataclass
class FlowConfig:
    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    p_uncond: float = 0.15  # probability a condition field is replaced by the learned null
    # probability that every field is replaced at once (Ho & Salimans' joint dropout): with
    # p_uncond alone the all-null branch, v_null of every guidance w != 1, sees p_uncond ** K of cells
    p_null: float = 0.0
    prior: str = "standard"  # the path's source: "standard" N(0, I), or "cell_type" (:class:`TypePrior`)

    def __post_init__(self):
        if self.prior not in PRIORS:
            raise ConfigError(f"flow.prior={self.prior!r}: choose {' or '.join(PRIORS)}")


PRIORS = ("standard", "cell_type")


class TypePrior:
    """Per-cell-type diagonal Gaussians in the DiT's standardised latent: the flow's source
    x_0 = loc[type] + scale[type] * eps. A type the statistics lack starts from N(0, I)."""

    def __init__(self, types: Sequence[str], loc: torch.Tensor, scale: torch.Tensor):
        self.index = {t: i for i, t in enumerate(types)}
        self.loc = torch.cat([loc.float(), torch.zeros(1, loc.shape[1])])  # last row: the standard normal
        self.scale = torch.cat([scale.float(), torch.ones(1, scale.shape[1])])

    @classmethod
    def fit(cls, types: Sequence[str], x: torch.Tensor, min_cells: int = 2, min_scale: float = 0.05) -> "TypePrior":
        """Mean and std per type of standardised latents ``x`` (n, dim); a type with fewer than
        ``min_cells`` cells keeps unit scale."""
        names = sorted(set(types))
        row = {t: i for i, t in enumerate(names)}
        labels = torch.tensor([row[t] for t in types])
        loc = torch.stack([x[labels == i].mean(0) for i in range(len(names))])
        scale = torch.stack([x[labels == i].std(0).clamp_min(min_scale) if int((labels == i).sum()) >= min_cells
                             else torch.ones(x.shape[1]) for i in range(len(names))])
        return cls(names, loc, scale)

    def to_dict(self) -> dict:
        rows = len(self.index)
        return {"types": list(self.index), "loc": [[round(float(v), 5) for v in r] for r in self.loc[:rows]],
                "scale": [[round(float(v), 5) for v in r] for r in self.scale[:rows]]}

    @classmethod
    def from_dict(cls, d: dict) -> "TypePrior":
        return cls(d["types"], torch.tensor(d["loc"]), torch.tensor(d["scale"]))

    def loc_scale(self, types: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, dim) location and scale of each cell's source."""
        rows = torch.tensor([self.index.get(t, len(self.index)) for t in types], dtype=torch.long)
        return self.loc[rows], self.scale[rows]


def sample_t(n: int, cfg: FlowConfig, generator: torch.Generator, device) -> torch.Tensor:
    u = torch.randn(n, generator=generator, device=device) * cfg.t_std + cfg.t_mean
    return torch.sigmoid(u)


def condition_drop(B: int, K: int, cfg: FlowConfig, generator: torch.Generator, device) -> torch.Tensor:
    """(B, K) fields put on the learned null: each with ``p_uncond``, and all of a cell's with
    ``p_null`` (no extra draw when 0, so runs trained before the option are reproduced)."""
    drop = torch.rand((B, K), generator=generator, device=device) < cfg.p_uncond
    if cfg.p_null > 0:
        drop |= torch.rand((B, 1), generator=generator, device=device) < cfg.p_null
    return drop


def flow_matching_loss(model, x1: torch.Tensor, cond: torch.Tensor, cfg: FlowConfig,
                       generator: torch.Generator, weight: torch.Tensor | None = None,
                       source: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean squared velocity error. ``x1`` (B, T, D) data latents; ``cond`` (B, K, C);
    ``weight`` (B,) optional per-cell weights of mean ~1 (``data/balance.py``); ``source``
    (loc, scale), each (B, T * D), the cells' Gaussian sources (:class:`TypePrior`), else N(0, I)."""
    B, K = x1.shape[0], cond.shape[1]
    t = sample_t(B, cfg, generator, x1.device)
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if source is not None:
        x0 = start_from(x0, source)
    tt = t.view(B, 1, 1).to(x1.dtype)
    xt = tt * x1 + (1 - tt) * x0
    drop = condition_drop(B, K, cfg, generator, x1.device)
    v = model(xt, t, cond, drop)
    err = (v.float() - (x1 - x0).float()).pow(2)
    return err.mean() if weight is None else (err.flatten(1).mean(1) * weight.to(err)).mean()


def start_from(eps: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``eps`` (B, T, D) standard noise moved to the sources (loc, scale), each (B, T * D)."""
    loc, scale = (s.to(eps).view(eps.shape) for s in source)
    return loc + scale * eps


DISEASE_SHIFTS = ("off", "latent", "expression")


@dataclass
class SamplerConfig:
    method: str = "euler"  # euler, heun, midpoint, sde
    steps: int = 20
    guidance: float = 2.0  # classifier-free guidance scale w (1 = conditional only, 0 = unconditional)
    field_weights: tuple[float, ...] | None = None  # compositional guidance, one weight per field
    # field mode: a full (type, tissue, disease) combination no training study has is sampled
    # with compositional guidance, every field at ``guidance`` (the generator applies it)
    compose_unseen: bool = True
    # field mode: a new combination whose healthy counterpart (type, tissue, normal) a training study
    # has, and whose disease the type has in another tissue, is sampled healthy and shifted by that
    # disease's mean effect on the type (the generator applies it; takes precedence over compose_unseen
    # for those combinations): "latent" adds it to the latent, "expression" to the decoded
    # log-proportions; "off" (or false) leaves such combinations to compose_unseen
    disease_shift: str = "off"
    interval: tuple[float, float] = (0.0, 1.0)  # apply guidance only for t in [lo, hi]
    noise: float = 0.0  # eta of the SDE sampler

    def __post_init__(self):
        legacy = {"false": "off", "true": "latent"}  # configs written when the option was a bool
        self.disease_shift = legacy.get(str(self.disease_shift).lower(), str(self.disease_shift))
        if self.disease_shift not in DISEASE_SHIFTS:
            raise ConfigError(f"sampler.disease_shift={self.disease_shift!r}: choose {', '.join(DISEASE_SHIFTS)}")

    def nfe_per_step(self, guided: bool = True) -> int:
        evals = 2 if self.method in ("heun", "midpoint") else 1
        n_branches = (len(self.field_weights) + 1) if self.field_weights else 2
        return evals * (n_branches if guided else 1)


def guided_velocity(model, x: torch.Tensor, t: float, cond: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """One guided velocity evaluation, all branches in one batched forward pass."""
    B, K = x.shape[0], cond.shape[1]
    tt = torch.full((B,), t, device=x.device)
    inside = cfg.interval[0] <= t <= cfg.interval[1]
    if not inside or cfg.guidance == 1.0 and not cfg.field_weights:
        weights = None
    elif cfg.field_weights:
        if len(cfg.field_weights) != K:
            raise ValueError(f"field_weights has {len(cfg.field_weights)} weights for {K} condition fields")
        weights = list(cfg.field_weights)
    else:
        weights = [cfg.guidance]
    if weights is None:  # plain conditional velocity
        return model(x, tt, cond, torch.zeros((B, K), dtype=torch.bool, device=x.device))
    # branch 0: everything dropped (v_null); branch k: the full condition (K=1) or field k only
    drops = [torch.ones((B, K), dtype=torch.bool, device=x.device)]
    if cfg.field_weights:
        for k in range(K):
            d = torch.ones((B, K), dtype=torch.bool, device=x.device)
            d[:, k] = False
            drops.append(d)
    else:
        drops.append(torch.zeros((B, K), dtype=torch.bool, device=x.device))
    n = len(drops)
    v = model(x.repeat(n, 1, 1), tt.repeat(n), cond.repeat(n, 1, 1), torch.cat(drops)).float()
    v = v.view(n, B, *x.shape[1:])
    out = v[0].clone()
    for w, vk in zip(weights, v[1:]):
        out += w * (vk - v[0])
    return out


@torch.no_grad()
def sample(model, cond: torch.Tensor, shape: tuple[int, int], cfg: SamplerConfig,
           generator: torch.Generator, x0: torch.Tensor | None = None,
           source: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Integrate from noise (``x0``, else drawn from ``generator``) to data. ``cond`` (B, K, C);
    returns latents (B, *shape). ``source`` (loc, scale), each (B, T * D), is the Gaussian ``x0``
    was drawn from (:class:`TypePrior`); only the SDE needs it, to run in the coordinates where
    that source is N(0, I)."""
    B = cond.shape[0]
    x = torch.randn((B, *shape), generator=generator, device=cond.device) if x0 is None else x0.to(cond.device)
    loc, scale = (0.0, 1.0) if source is None else (s.to(x).view(x.shape) for s in source)
    ts = torch.linspace(0.0, 1.0, cfg.steps + 1).tolist()
    for i in range(cfg.steps):
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        v0 = guided_velocity(model, x, t0, cond, cfg)
        if cfg.method == "euler":
            x = x + h * v0
        elif cfg.method == "midpoint":
            x = x + h * guided_velocity(model, x + 0.5 * h * v0, t0 + 0.5 * h, cond, cfg)
        elif cfg.method == "heun":
            x_pred = x + h * v0
            if i == cfg.steps - 1:
                x = x_pred  # t1 = 1: no second evaluation at the data end
            else:
                x = x + 0.5 * h * (v0 + guided_velocity(model, x_pred, t1, cond, cfg))
        elif cfg.method == "sde":
            # in whitened coordinates x' = (x - loc) / scale the path is the N(0, I) one; mapped back,
            # the score term is -(x - loc - t v) / (1 - t) and the noise is scaled by ``scale``
            eta = cfg.noise
            drift = v0 - 0.5 * eta * (x - loc - t0 * v0)
            x = x + h * drift
            if i < cfg.steps - 1 and eta > 0:
                x = x + scale * (eta * (1 - t0) * h) ** 0.5 * torch.randn(x.shape, generator=generator,
                                                                          device=x.device)
        else:
            raise ValueError(f"sampler method {cfg.method!r}: use euler, heun, midpoint or sde")
    return x
