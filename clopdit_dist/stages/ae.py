"""Stage 0: the count autoencoder (model: ``models/autoencoder.py``; loss: NB/ZINB NLL, plus the
cell-type and disease heads' cross-entropies on the latent when ``model.type_loss`` / ``model.disease_loss`` > 0).

    deepspeed --num_gpus 2 launchers/train_ae.py --config configs/ae.yaml
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.balance import CellTypeWeights
from ..data.loader import CellLoader, iter_split
from ..errors import ConfigError
from ..evaluate.reconstruction import reconstruction_metrics
from ..models.autoencoder import AEConfig, CountAutoencoder, nb_theta_by_moments
from ..models.codec import record_codec
from ..run import RunDir
from ..train.config import StageConfig
from ..train.stage import Stage


# the type classifier's cross-entropy weighs a cell n_type ** -0.5 (as the DiT's flow loss does), so
# rare types count in it without one type of ten cells steering it
TYPE_LOSS_BALANCE = 0.5


@dataclass
class AEStageConfig(StageConfig):
    model: AEConfig = field(default_factory=AEConfig)
    # the per-gene NB inverse dispersion the exported codec samples counts with: "learned" (fitted with the
    # NB loss, against means the encoder's dropout makes noisier than the ones generation decodes, so it
    # comes out low: 0.69x the embedded atlas's true one at the median, seed 0) or "moments" (re-estimated
    # after training by moments on the eval-mode means of up to ``dispersion_cells`` training cells) or "thinned"
    # (the same moments on binomially thinned cells: one half's counts around the mean decoded from the other half,
    # so the mean has not fitted the noise it is compared with; :meth:`AEStage.moment_dispersion`)
    dispersion: str = "learned"
    dispersion_cells: int = 20_000

    def __post_init__(self):
        if self.dispersion not in ("learned", "moments", "thinned"):
            raise ConfigError(f"dispersion={self.dispersion!r}: choose learned, moments or thinned")
        if self.dispersion != "learned" and self.model.likelihood != "nb":
            raise ConfigError(f"dispersion={self.dispersion} estimates an NB dispersion, not a {self.model.likelihood} "
                              "one: use dispersion=learned with that likelihood")


class AEStage(Stage):
    name = "ae"

    def fields(self):
        return ("cell_type", "disease") if self.cfg.model.disease_loss > 0 else ("cell_type",)

    def setup(self, run: RunDir, loader: CellLoader, device: torch.device) -> None:
        self.cfg.model.n_genes = len(loader.gene_idx)
        self.gene_ids = loader.gene_ids
        self.device = device
        self.balance = self.balance_weights(run)
        self.type_weights = CellTypeWeights.from_manifest(run.manifest(), TYPE_LOSS_BALANCE)
        self.type_index = {t: i for i, t in enumerate(sorted(self.type_weights.table))}  # training types
        self.cfg.model.n_types = len(self.type_index)
        if self.cfg.model.disease_loss > 0:
            disease_cells: dict[str, int] = {}
            for c in run.manifest().data["conditions"]["splits"]["train"]:
                disease_cells[c["disease"]] = disease_cells.get(c["disease"], 0) + c["n_cells"]
            self.disease_weights = CellTypeWeights(disease_cells, TYPE_LOSS_BALANCE)  # any label's counts will do
            self.disease_index = {d: i for i, d in enumerate(sorted(self.disease_weights.table))}
            self.cfg.model.n_diseases = len(self.disease_index)

    def build_model(self) -> torch.nn.Module:
        return CountAutoencoder(self.cfg.model)

    def loss(self, model, batch, generator):
        counts, types = batch["counts"].to(self.device, non_blocking=True), batch["cell_type"]
        kw = {}
        if self.cfg.model.type_loss > 0:
            kw |= {"cell_type": torch.tensor([self.type_index.get(t, -1) for t in types], device=self.device),
                   "type_weight": self.type_weights(types).to(self.device)}
        if self.cfg.model.disease_loss > 0:
            diseases = batch["disease"]
            kw |= {"disease": torch.tensor([self.disease_index.get(d, -1) for d in diseases], device=self.device),
                   "disease_weight": self.disease_weights(diseases).to(self.device)}
        out = model(counts, self.balance(types).to(self.device) if self.balance else None, **kw)
        metrics = {"nll_per_gene": out["nll"].detach() / counts.shape[1]}
        metrics |= {k: out[k].detach() for k in ("type_ce", "disease_ce") if k in out}
        return out["loss"], metrics

    def flops_per_cell(self, model) -> float:
        n = sum(p.numel() for p in model.parameters())
        return 6.0 * n  # forward + backward of dense layers, 2 FLOPs per weight per pass x 3

    def _round_trips(self, model, split: str, max_cells: int, device="cpu", batch_size: int = 512,
                     thin: torch.Generator | None = None):
        """(counts, decoded NB parameters) per batch of up to ``max_cells`` cells of ``split``, each cell
        encoded and decoded by ``model``. With ``thin`` (a generator) each cell is split by binomial thinning,
        x1 ~ Binomial(x, 1/2), and the counts given are x2 = x - x1 with the parameters decoded from x1 at x2's
        library: given the cell's NB (Gamma) rate the halves' Poisson noise is independent and x2 is NB with
        the same inverse dispersion (data thinning; Neufeld, Dharamshi, Gao & Witten, JMLR 2024)."""
        d = self.cfg.data
        for batch in iter_split(d.shards, split, d.genes, max_cells, batch_size=batch_size):
            x = batch["counts"].to(device)
            if thin is None:
                yield x, model.decode(model.encode(x), x.sum(-1))
            else:
                x1 = torch.binomial(x, torch.full_like(x, 0.5), generator=thin)
                yield x - x1, model.decode(model.encode(x1), (x - x1).sum(-1))

    @torch.no_grad()
    def evaluate(self, model, run: RunDir, device) -> dict:
        d = self.cfg.data
        counts, means, nll = [], [], []
        for x, params in self._round_trips(model, d.eval_split, d.eval_cells, device):
            counts.append(x.cpu().numpy())
            means.append(params["mu"].cpu().numpy())
            nll.append((-model.log_prob(x, params)).cpu().numpy())
        if not counts:
            return {"split": d.eval_split, "cells": 0}
        metrics = reconstruction_metrics(np.concatenate(counts), np.concatenate(means), np.concatenate(nll))
        return {"split": d.eval_split, **metrics}

    @torch.no_grad()
    def moment_dispersion(self, state_dict: dict, thinned: bool = False) -> torch.Tensor:
        """theta by moments (``nb_theta_by_moments``) on training cells encoded and decoded by the trained
        weights in eval mode: the means generation samples counts around. ``thinned``: on thinned halves
        (``_round_trips(thin=...)``), where the mean has not seen the counts it is compared with; on the cell's
        own mean the estimate comes out high (1.3-1.7x the embedded atlas's at the median, seeds 0/1/2;
        README, "What a perfect generator scores")."""
        model = self.build_model()
        model.load_state_dict(state_dict)
        model.eval()
        counts, means = [], []
        thin = torch.Generator().manual_seed(0) if thinned else None
        for x, params in self._round_trips(model, "train", self.cfg.dispersion_cells, batch_size=2048, thin=thin):
            counts.append(x)
            means.append(params["mu"])
        n = self.cfg.dispersion_cells
        return nb_theta_by_moments(torch.cat(counts)[:n], torch.cat(means)[:n])

    def export(self, state_dict, run: RunDir) -> None:
        if self.cfg.dispersion != "learned":
            state_dict["log_theta"] = self.moment_dispersion(state_dict, self.cfg.dispersion == "thinned").log()
        run.save_weights(self.name, state_dict, {"genes": json.dumps(self.gene_ids)})
        record_codec(run, "autoencoder")
