"""Per-cell loss weights that give rare cell types more of a model's capacity.

A cell of a type with ``n_t`` training cells weighs ``n_t ** -power``, normalised so the mean
weight over the training cells is 1 and capped at ``max_weight`` (a type with one cell must not
steer whole batches). ``power`` 0 is the plain mean; 0.5 is square-root re-balancing
(Mahajan et al. 2018, "Exploring the limits of weakly supervised pretraining"; Kang et al. 2020,
"Decoupling representation and classifier for long-tailed recognition", re-sampling with
q = 1 - power), applied here as a loss weight instead of a sampler so the shard stream is untouched.

Why it is sound for a conditional generator: a weight that depends only on the condition leaves
each condition's minimiser of the flow-matching loss (the conditional velocity field) unchanged
and moves optimisation effort towards conditions with few cells; only the unconditional branch
(the classifier-free null) learns the re-weighted mixture. For the autoencoder it trades some
reconstruction of abundant types for that of rare ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class CellTypeWeights:
    """``weights(cell_types) -> (B,) float tensor``; types never seen in training weigh 1."""

    def __init__(self, counts: dict[str, int], power: float, max_weight: float = 10.0):
        if power < 0 or max_weight < 1:
            raise ValueError(f"balance power must be >= 0 and max weight >= 1 (got {power}, {max_weight})")
        names = [t for t, n in counts.items() if n > 0]
        n = np.array([counts[t] for t in names], dtype=np.float64)
        w = n ** -power
        for _ in range(2):  # normalise, cap, renormalise (the cap moves the mean a little)
            w = np.minimum(w * n.sum() / (n * w).sum(), max_weight)
        self.power = power
        self.table = dict(zip(names, w.tolist()))

    @classmethod
    def from_manifest(cls, manifest, power: float, max_weight: float = 10.0) -> "CellTypeWeights":
        """Weights from the training split's cell-type counts recorded in the shard manifest."""
        return cls(manifest.data["cell_types"]["train"], power, max_weight)

    def __call__(self, cell_types: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.table.get(t, 1.0) for t in cell_types], dtype=torch.float32)
