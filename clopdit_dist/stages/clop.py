"""Stage 1: CLOP, contrastive language–omics pretraining.

Cells go through the frozen stage-0 encoder and a projection head; their captions (built
from metadata, augmented) through the text tower and a projection head; a symmetric InfoNCE
(or SigLIP) loss with multi-positive targets aligns the two, negatives gathered from all
ranks (``models/clop.py``). With a frozen text tower the text features of a bank of
augmented captions per training condition are computed once (:class:`CaptionBank`), so a
step costs no text-tower forward pass.

    deepspeed --num_gpus 2 launchers/train_clop.py --config configs/clop.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..data.captions import CaptionBuilder
from ..data.conditions import CONDITION_FIELDS, condition_ids, train_conditions
from ..data.loader import iter_split
from ..errors import ConfigError
from ..evaluate.clop_metrics import knn_study_entropy, text_to_cell_recall, zero_shot_classification
from ..models.clop import CLOP, ClopModelConfig
from ..models.codec import CodecConfig, load_codec, prepare_codec
from ..models.condition import ConditionEncoder, shared_caption_bank
from ..models.text import TextTower
from ..run import RunDir
from ..train.config import StageConfig
from ..train.stage import Stage


@dataclass
class ClopStageConfig(StageConfig):
    model: ClopModelConfig = field(default_factory=ClopModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)  # the latent CLOP (and then the DiT) reads


class ClopTrainModule(torch.nn.Module):
    """What the engine trains: the projection heads, plus the text tower if part of it is trainable."""

    def __init__(self, clop: CLOP, tower: TextTower | None):
        super().__init__()
        self.clop = clop
        self.tower = tower

    def forward(self, z, text, keys):
        feats = self.tower(text) if self.tower is not None else text
        dtype = self.clop.logit_scale.dtype  # bf16 engines do not cast inputs
        return self.clop(z.to(dtype), feats.to(dtype), keys)


class ClopStage(Stage):
    name = "clop"

    def fields(self):
        return ("cell_type", "tissue_general", "disease", "dataset_id")

    def genes(self, run: RunDir):
        rank = dist.get_rank() if dist.is_initialized() else 0
        prepare_codec(run, self.cfg.codec, self.cfg.data.shards, rank)
        self.codec = load_codec(run)
        return self.codec.genes

    def setup(self, run: RunDir, loader, device) -> None:
        if self.cfg.data.balance:
            raise ConfigError("data.balance weights per-cell losses (the ae and dit stages); CLOP's contrastive "
                              "loss has none: drop data.balance from the clop config")
        m = self.cfg.model
        self.device = device
        self.codec = self.codec.to(device)
        self.builder = CaptionBuilder.from_manifest(run.manifest(), n_markers=m.n_markers)
        self.tower = m.text_tower()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.bank = None
        if self.tower.frozen:
            os.makedirs(run.stage_dir(self.name), exist_ok=True)
            self.bank = shared_caption_bank(os.path.join(run.stage_dir(self.name), "caption_bank.pt"), self.builder,
                                            train_conditions(run.manifest()), m.captions_per_condition, self.tower,
                                            self.cfg.train.seed, self.rank)

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        return ClopTrainModule(m.build(self.tower.dim, self.codec.latent_dim), None if self.tower.frozen else self.tower)

    def loss(self, model, batch, generator):
        counts = batch["counts"].to(self.device)
        with torch.no_grad():
            z = self.codec.encode(counts)
        keys = self.builder.batch_keys(batch)
        ids = torch.from_numpy(condition_ids(keys)).to(self.device)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        if self.bank is not None:
            text = self.bank.sample(keys, rng)[0].to(self.device)
            if self.cfg.model.text_noise > 0:
                text = text + self.cfg.model.text_noise * torch.randn(text.shape, generator=generator,
                                                                      device=text.device)
        else:
            text = self.builder.batch(batch, "augment", rng)
        return model(z, text, ids)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, run: RunDir, device) -> dict:
        d = self.cfg.data
        clop, tower = model.clop, model.tower or self.tower
        cells, counts, types, studies, conds = [], [], [], [], []
        for batch in iter_split(d.shards, d.eval_split, self.codec.genes, d.eval_cells,
                                  fields=("cell_type", "tissue_general", "disease", "dataset_id")):
            z = self.codec.encode(batch["counts"].to(device))
            cells.append(clop.encode_cell(z).cpu())
            counts.append(batch["counts"].numpy())
            types += batch["cell_type"]
            studies += batch["dataset_id"]
            conds += self.builder.batch_keys(batch)
        if not cells:
            return {"split": d.eval_split, "cells": 0}
        cell_emb = torch.cat(cells)
        classes = sorted(set(run.manifest().data["cell_types"]["train"]) | set(types))
        out = {"split": d.eval_split, "cells": len(types), "classes": len(classes)}
        encoders = {"": ConditionEncoder(tower, clop, self.builder, "caption")}
        if self.bank is not None and self.cfg.model.prompt_anchor_k > 0:
            encoders["_anchored"] = ConditionEncoder(tower, clop, self.builder, "caption", self.bank,
                                                     self.cfg.model.prompt_anchor_k, self.cfg.model.prompt_anchor_tau)
        for suffix, enc in encoders.items():
            for style in ("canonical", "paraphrase", "rare"):
                captions = self.builder.zero_shot_captions(classes, style, np.random.default_rng(0))
                zs = zero_shot_classification(cell_emb, enc.encode_texts(captions), types, classes)
                out[f"zero_shot_{style}{suffix}"] = {"accuracy": zs["accuracy"], "macro_f1": zs["macro_f1"]}
        metas = {k: dict(zip(CONDITION_FIELDS, k.split("|"))) for k in sorted(set(conds))}
        cond_text = encoders[""].encode_texts([self.builder.canonical(m) for m in metas.values()])
        out["retrieval"] = text_to_cell_recall(cond_text.cpu(), list(metas), cell_emb, conds)
        out["knn_study_entropy"] = knn_study_entropy(cell_emb, studies) if len(set(studies)) > 1 else None
        out["knn_pca_baseline"] = knn_pca_accuracy(d.shards, self.codec.genes, np.concatenate(counts), types)
        out["paraphrase_gap"] = out["zero_shot_canonical"]["accuracy"] - out["zero_shot_paraphrase"]["accuracy"]
        return out

    def export(self, state_dict, run: RunDir) -> None:
        if self.tower.frozen:  # the tower is named in the config, not copied
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("tower.")}
        run.save_weights(self.name, state_dict)


def knn_pca_accuracy(shards: str, genes: list[str], heldout_counts: np.ndarray, heldout_types: list[str],
                     train_cells: int = 20_000) -> float:
    """The baseline of CLOP's zero-shot accuracy: CLOP's zero-shot over the training labels is
    supervised by those labels, so it stands beside a kNN classifier (k=15) on PCA-50 of log1p
    CP10k fitted on training cells and scored on the same held-out cells."""
    from ..evaluate.metrics import EvalSpace, KNNJudge

    parts, types = [], []
    for batch in iter_split(shards, "train", genes, train_cells, batch_size=2048):
        parts.append(batch["counts"].numpy())
        types += batch["cell_type"]
    space = EvalSpace(np.concatenate(parts))
    judge = KNNJudge(space.embed(np.concatenate(parts)), types)
    return judge.identity(space.embed(heldout_counts), np.asarray(heldout_types))["accuracy"]
