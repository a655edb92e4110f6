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
``"condition"`` keys the Gaussian by (cell type, tissue, disease), with an additive back-off
for combinations training lacks (:class:`GaussianPrior`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
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
    # the path's source: "standard" N(0, I), or "cell_type" / "condition" (:class:`GaussianPrior`)
    prior: str = "standard"
    # a condition source's spread: "own", its condition's std; "type", its cell type's (one width
    # for every combination, those the additive model composes included)
    prior_spread: str = "own"

    def __post_init__(self):
        if self.prior not in PRIORS:
            raise ConfigError(f"flow.prior={self.prior!r}: choose {' or '.join(PRIORS)}")
        if self.prior_spread not in ("own", "type"):
            raise ConfigError(f"flow.prior_spread={self.prior_spread!r}: choose 'own' or 'type'")


PRIORS = ("standard", "cell_type", "condition")
PRIOR_FIELDS = {"cell_type": ("cell_type",), "condition": ("cell_type", "tissue_general", "disease")}
PRIOR_STATS = {"cell_type": "type_prior", "condition": "condition_prior"}  # their keys in a DiT's latent_stats.json


class GaussianPrior:
    """Diagonal Gaussians in the DiT's standardised latent, one per condition: the flow's source
    x_0 = loc[c] + scale[c] * eps.

    ``fields`` name the condition; the first (the cell type) is the coarsest level. A cell's
    source is the Gaussian of its full condition where training had ``min_cells`` of it; for a
    combination no training study has (or too few cells of it), the mean of an additive model
    of the type's conditions (one effect per tissue, per disease: the composition of attribute
    effects that CFGen's compositional guidance also assumes) with the type's spread; else the
    type's Gaussian; a type the statistics lack starts from N(0, I). With ``fields =
    ("cell_type",)`` this is the per-type prior of ``flow.prior=cell_type``."""

    def __init__(self, fields: Sequence[str], keys: Sequence[tuple], loc: torch.Tensor, scale: torch.Tensor):
        self.fields = tuple(fields)
        self.index = {tuple(k): i for i, k in enumerate(keys)}
        self.loc, self.scale = loc.float(), scale.float()

    @classmethod
    def fit(cls, cells: Sequence[dict], x: torch.Tensor, fields: Sequence[str] = ("cell_type",),
            min_cells: int = 20, min_scale: float = 0.05) -> "GaussianPrior":
        """Fitted on standardised latents ``x`` (n, dim): per type its mean and std (a type with
        fewer than 2 cells keeps unit scale); per condition with at least ``min_cells`` cells its
        own; and per other combination of values seen with the type (a tissue and a disease
        never seen together) the additive model's mean, intercept + one effect per field value,
        fitted on the type's condition means weighted by cell count (the effects with a ridge of
        one pseudo-cell, for those the conditions do not identify), with the type's std."""
        fields = tuple(fields)
        values = [tuple(c[f] for f in fields) for c in cells]
        by_condition: dict[tuple, list[int]] = {}
        for i, v in enumerate(values):
            by_condition.setdefault(v, []).append(i)
        keys, loc, scale = [], [], []
        for t in sorted({v[0] for v in values}):
            conds = sorted((v for v in by_condition if v[0] == t), key=str)
            r = torch.tensor([i for v in conds for i in by_condition[v]])
            type_scale = x[r].std(0).clamp_min(min_scale) if len(r) >= 2 else torch.ones(x.shape[1])
            keys.append((t,) + (None,) * (len(fields) - 1))
            loc.append(x[r].mean(0))
            scale.append(type_scale)
            if len(fields) == 1:
                continue
            means = torch.stack([x[by_condition[v]].mean(0) for v in conds])
            own = [v for v in conds if len(by_condition[v]) >= min_cells]
            for v in own:
                keys.append(v)
                loc.append(means[conds.index(v)])
                scale.append(x[by_condition[v]].std(0).clamp_min(min_scale))
            seen = [sorted({v[j] for v in conds}, key=str) for j in range(1, len(fields))]
            terms = [(j, val) for j, vals in enumerate(seen, 1) for val in vals]

            def row(v):
                return [1.0] + [float(v[j] == val) for j, val in terms]

            design = torch.tensor([row(v) for v in conds])
            n = torch.tensor([float(len(by_condition[v])) for v in conds])
            ridge = torch.diag(torch.tensor([0.0] + [1.0] * len(terms)))
            coef = torch.linalg.solve(design.T @ (n[:, None] * design) + ridge, design.T @ (n[:, None] * means))
            for combo in itertools.product(*seen):
                v = (t, *combo)
                if v not in own:
                    keys.append(v)
                    loc.append(torch.tensor(row(v)) @ coef)
                    scale.append(type_scale)
        return cls(fields, keys, torch.stack(loc), torch.stack(scale))

    def to_dict(self) -> dict:
        return {"fields": list(self.fields), "keys": [list(k) for k in self.index],
                "loc": [[round(float(v), 5) for v in r] for r in self.loc],
                "scale": [[round(float(v), 5) for v in r] for r in self.scale]}

    @classmethod
    def from_dict(cls, d: dict) -> "GaussianPrior":
        if "types" in d:  # a run's per-type prior, written before conditions were keyed
            return cls(("cell_type",), [(t,) for t in d["types"]], torch.tensor(d["loc"]), torch.tensor(d["scale"]))
        return cls(d["fields"], [tuple(k) for k in d["keys"]], torch.tensor(d["loc"]), torch.tensor(d["scale"]))

    def with_type_spread(self) -> "GaussianPrior":
        """The same locations, each with its cell type's scale."""
        none = (None,) * (len(self.fields) - 1)
        scale = torch.stack([self.scale[self.index[(k[0],) + none]] for k in self.index])
        return GaussianPrior(self.fields, list(self.index), self.loc, scale)

    def _source(self, cell: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        for key in (cell, (cell[0],) + (None,) * (len(cell) - 1)):
            if key in self.index:
                return self.loc[self.index[key]], self.scale[self.index[key]]
        return torch.zeros(self.loc.shape[1]), torch.ones(self.loc.shape[1])

    def loc_scale(self, cells: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, dim) location and scale of each cell's source; ``cells`` are dicts of the fields."""
        keys = [tuple(c.get(f) for f in self.fields) for c in cells]
        rows = {k: self._source(k) for k in set(keys)}
        return (torch.stack([rows[k][0] for k in keys]) if keys else self.loc[:0],
                torch.stack([rows[k][1] for k in keys]) if keys else self.scale[:0])


def load_prior(stats: dict, cfg: FlowConfig) -> "GaussianPrior | None":
    """The flow's source named by ``cfg.prior`` from a DiT's latent statistics; None for N(0, I)."""
    if cfg.prior == "standard":
        return None
    prior = GaussianPrior.from_dict(stats[PRIOR_STATS[cfg.prior]])
    return prior.with_type_spread() if cfg.prior_spread == "type" else prior


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
    (loc, scale), each (B, T * D), the cells' Gaussian sources (:class:`GaussianPrior`), else N(0, I)."""
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


class CellNoise:
    """The SDE sampler's step noise, every cell's from a stream of its own block.

    The cells of stream ``s`` (a prompt's seed) come in blocks of ``block``; block ``b`` draws
    one (block cells, *shape) standard normal per step from a generator seeded (s, b), and each
    of its cells takes its row. A cell's noise thus depends on its stream and its place there
    only: not on the other prompts of the call, nor on how the call is split into batches, so
    one prompt's change leaves the other prompts' cells as they were.
    """

    def __init__(self, seeds: Sequence[int], counts: Sequence[int], shape: tuple[int, ...], block: int = 256):
        self.shape = tuple(shape)
        keys, pos, size = [], [], []
        for s, n in zip(seeds, counts, strict=True):
            for b, start in enumerate(range(0, n, block)):
                m = min(block, n - start)
                keys += [int(np.random.SeedSequence([s % 2 ** 63, b]).generate_state(1, np.uint64)[0] >> 1)] * m
                pos += range(m)
                size += [m] * m
        self.key, self.pos, self.size = np.array(keys, np.int64), np.array(pos, np.int64), np.array(size, np.int64)

    def __len__(self) -> int:
        return len(self.key)

    def take(self, rows) -> "CellNoise":
        """The noise of a subset of cells (a slice, a boolean mask or indices)."""
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        out = object.__new__(CellNoise)
        out.shape, out.key, out.pos, out.size = self.shape, self.key[rows], self.pos[rows], self.size[rows]
        return out

    def steps(self, device=None) -> Iterator[torch.Tensor]:
        """(cells, *shape) noise for step after step."""
        keys, block_of = np.unique(self.key, return_inverse=True)
        order = np.argsort(block_of, kind="stable")
        bounds = np.searchsorted(block_of[order], np.arange(len(keys) + 1))
        blocks = [(torch.Generator().manual_seed(int(k)), int(self.size[order[a]]), torch.from_numpy(order[a:b]),
                   torch.from_numpy(self.pos[order[a:b]])) for k, a, b in zip(keys, bounds[:-1], bounds[1:])]
        while True:
            out = torch.empty((len(self), *self.shape))
            for g, m, rows, pos in blocks:
                out[rows] = torch.randn((m, *self.shape), generator=g)[pos]
            yield out if device is None else out.to(device)


@torch.no_grad()
def sample(model, cond: torch.Tensor, shape: tuple[int, int], cfg: SamplerConfig,
           generator: torch.Generator, x0: torch.Tensor | None = None,
           source: tuple[torch.Tensor, torch.Tensor] | None = None,
           noise: CellNoise | None = None) -> torch.Tensor:
    """Integrate from noise (``x0``, else drawn from ``generator``) to data. ``cond`` (B, K, C);
    returns latents (B, *shape). ``source`` (loc, scale), each (B, T * D), is the Gaussian ``x0``
    was drawn from (:class:`GaussianPrior`); only the SDE needs it, to run in the coordinates where
    that source is N(0, I). The SDE's step noise comes from ``noise`` (one stream per cell
    block, :class:`CellNoise`) where given, else from ``generator``."""
    B = cond.shape[0]
    if noise is not None and len(noise) != B:
        raise ValueError(f"noise holds {len(noise)} cells for a batch of {B}")
    step_noise = None if noise is None else noise.steps(cond.device)
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
                eps = torch.randn(x.shape, generator=generator, device=x.device) if step_noise is None \
                    else next(step_noise)
                x = x + scale * (eta * (1 - t0) * h) ** 0.5 * eps
        else:
            raise ValueError(f"sampler method {cfg.method!r}: use euler, heun, midpoint or sde")
    return x
