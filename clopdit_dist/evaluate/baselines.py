"""Reference generators, scored by the same code as the model in the same run.

Each returns a :class:`CellSet` for one condition: counts where the generator makes counts,
and always the embedding (PCA of the evaluation space) and log expression on its HVGs.

* :func:`real_half`: the other half of the real held-out cells of the condition: the
  ceiling (what a perfect generator of that very study scores).
* :func:`codec_roundtrip`: half B encoded by the run's codec and sampled back to counts:
  the ceiling of any generator that works in that latent space (its decoded means are the
  ceiling of ``diversity_means``).
* :func:`training_copies`: training-study cells of the same condition, drawn with
  replacement: what a perfect model of the *training* distribution scores, and the
  memorisation reference.
* :func:`condition_gaussian`: a Gaussian in the evaluation PCA space fitted on training cells
  of the condition (Ledoit–Wolf shrunk covariance); its expression is the PCA inverse.
* :func:`type_mean_nb`: the training mean profile of the cell type, times a library size
  drawn from the condition's training cells, with negative-binomial counts at the codec's
  per-gene dispersion: no within-type structure at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.autoencoder import nb_sample
from .metrics import EvalSpace


@dataclass
class CellSet:
    embed: np.ndarray  # (n, n_pcs)
    expr: np.ndarray  # (n, n_hvg) log1p CP10k
    counts: np.ndarray | None = None  # (n, genes) when the generator makes counts
    mean_embed: np.ndarray | None = None  # embedding of decoded means (before count sampling)

    @classmethod
    def from_counts(cls, space: EvalSpace, counts: np.ndarray, **kw) -> "CellSet":
        expr = space.expr(counts)
        return cls(space.embed_expr(expr), expr, counts, **kw)

    def __len__(self) -> int:
        return len(self.embed)


def real_half(space: EvalSpace, counts: np.ndarray) -> CellSet:
    return CellSet.from_counts(space, counts)


def codec_roundtrip(space: EvalSpace, codec, counts: np.ndarray, rng: np.random.Generator) -> CellSet:
    x = torch.from_numpy(counts)
    lib = x.sum(-1)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        z = codec.encode(x)
        out = codec.sample(z, lib, generator=g).cpu().numpy()
        mu = codec.decode(z, lib)["mu"].cpu().numpy()
    # the decoded means of real cells' own latents: the reference for the model's diversity_means,
    # which lacks the count noise that real cells' diversity includes
    return CellSet.from_counts(space, out, mean_embed=space.embed(mu))


def training_copies(space: EvalSpace, train_counts: np.ndarray, n: int, rng: np.random.Generator) -> CellSet | None:
    if len(train_counts) == 0:
        return None
    return CellSet.from_counts(space, train_counts[rng.integers(0, len(train_counts), n)])


def condition_gaussian(space: EvalSpace, train_embed: np.ndarray, n: int, rng: np.random.Generator) -> CellSet | None:
    from sklearn.covariance import LedoitWolf

    if len(train_embed) < 3:
        return None
    cov = LedoitWolf().fit(train_embed).covariance_
    z = rng.multivariate_normal(train_embed.mean(0), cov, size=n, method="cholesky").astype(np.float32)
    return CellSet(z, space.pca.inverse_transform(z).astype(np.float32))


def type_mean_nb(space: EvalSpace, type_counts: np.ndarray, condition_libraries: np.ndarray, theta: np.ndarray,
                 n: int, rng: np.random.Generator) -> CellSet | None:
    if len(type_counts) == 0 or len(condition_libraries) == 0:
        return None
    prop = type_counts.sum(0) / max(type_counts.sum(), 1.0)
    lib = condition_libraries[rng.integers(0, len(condition_libraries), n)]
    mu = torch.from_numpy((lib[:, None] * prop[None, :]).astype(np.float32))
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    counts = nb_sample(mu, torch.from_numpy(theta.astype(np.float32)).expand_as(mu), g).numpy()
    return CellSet.from_counts(space, counts)
