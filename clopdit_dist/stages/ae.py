"""Stage 0: the count autoencoder (model: ``models/autoencoder.py``; loss: NB/ZINB NLL).

    deepspeed --num_gpus 2 launchers/train_ae.py --config configs/ae.yaml
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.loader import CellLoader, iter_split
from ..evaluate.reconstruction import reconstruction_metrics
from ..models.autoencoder import AEConfig, CountAutoencoder
from ..models.codec import record_codec
from ..run import RunDir
from ..train.config import StageConfig
from ..train.stage import Stage


@dataclass
class AEStageConfig(StageConfig):
    model: AEConfig = field(default_factory=AEConfig)


class AEStage(Stage):
    name = "ae"

    def fields(self):
        return ("cell_type",)

    def setup(self, run: RunDir, loader: CellLoader, device: torch.device) -> None:
        self.cfg.model.n_genes = len(loader.gene_idx)
        self.gene_ids = loader.gene_ids
        self.device = device
        self.balance = self.balance_weights(run)

    def build_model(self) -> torch.nn.Module:
        return CountAutoencoder(self.cfg.model)

    def loss(self, model, batch, generator):
        counts = batch["counts"].to(self.device, non_blocking=True)
        nll = model(counts, self.balance(batch["cell_type"]).to(self.device) if self.balance else None)
        return nll, {"nll_per_gene": nll.detach() / counts.shape[1]}

    def flops_per_cell(self, model) -> float:
        n = sum(p.numel() for p in model.parameters())
        return 6.0 * n  # forward + backward of dense layers, 2 FLOPs per weight per pass x 3

    @torch.no_grad()
    def evaluate(self, model, run: RunDir, device) -> dict:
        d = self.cfg.data
        counts, means, nll = [], [], []
        for batch in iter_split(d.shards, d.eval_split, d.genes, d.eval_cells):
            x = batch["counts"].to(device)
            params = model.decode(model.encode(x), x.sum(-1))
            counts.append(x.cpu().numpy())
            means.append(params["mu"].cpu().numpy())
            nll.append((-model.log_prob(x, params)).cpu().numpy())
        if not counts:
            return {"split": d.eval_split, "cells": 0}
        metrics = reconstruction_metrics(np.concatenate(counts), np.concatenate(means), np.concatenate(nll))
        return {"split": d.eval_split, **metrics}

    def export(self, state_dict, run: RunDir) -> None:
        run.save_weights(self.name, state_dict, {"genes": json.dumps(self.gene_ids)})
        record_codec(run, "autoencoder")
