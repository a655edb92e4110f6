"""The contract between a stage (autoencoder, CLOP, DiT) and the one training loop
(:func:`clopdit_dist.train.trainer.train`): a model, a loss, an evaluation, an export."""

from __future__ import annotations

import torch

from ..data.balance import CellTypeWeights
from ..data.loader import DEFAULT_FIELDS, CellLoader
from ..run import RunDir


class Stage:
    """What a stage provides. ``cfg`` has ``train``, ``optim``, ``data`` and ``model`` sections."""

    name: str = "stage"

    def __init__(self, cfg):
        self.cfg = cfg

    def fields(self) -> tuple[str, ...]:
        """Metadata fields the stage needs in its batches."""
        return DEFAULT_FIELDS

    def genes(self, run: RunDir):
        """The genes of the stage's batches: ``data.genes``, or (for stages on top of the
        autoencoder) exactly the autoencoder's genes."""
        return self.cfg.data.genes

    def setup(self, run: RunDir, loader: CellLoader, device: torch.device) -> None:
        """Called once before the model is built (load frozen parts, caches...)."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def balance_weights(self, run: RunDir) -> CellTypeWeights | None:
        """``data.balance``'s per-cell-type loss weights (None when off), for stages whose loss is
        a mean over cells; such a stage asks for ``cell_type`` in :meth:`fields`."""
        d = self.cfg.data
        return CellTypeWeights.from_manifest(run.manifest(), d.balance, d.balance_max_weight) if d.balance else None

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch and extra metrics to log. ``model`` is the module
        ``build_model`` returned, unwrapped (its own methods and submodules), except that
        calling it runs DeepSpeed's forward (:class:`~.engine.StageModel`): call it for every
        forward whose output the loss depends on. ``generator`` is the micro-step's seeded RNG."""
        raise NotImplementedError

    def flops_per_cell(self, model: torch.nn.Module) -> float | None:
        """Training FLOPs per cell (forward + backward) for MFU; None if unknown."""
        return None

    def evaluate(self, model: torch.nn.Module, run: RunDir, device: torch.device) -> dict:
        """Held-out evaluation on rank 0 with the final (EMA) weights, and every
        ``train.eval_every`` steps with the current ones (logged as ``eval/<key>``)."""
        return {}

    def export(self, state_dict: dict, run: RunDir) -> None:
        """Write inference weights (rank 0)."""
        run.save_weights(self.name, state_dict)
