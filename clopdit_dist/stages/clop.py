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

from ..data.captions import CAPTION_FIELDS, CaptionBuilder
from ..data.conditions import FIELD_NAMES, condition_ids, parse_fields, train_conditions
from ..evaluate.clop_metrics import knn_study_entropy, text_to_cell_recall, zero_shot_classification
from ..models.clop import CLOP
from ..models.text import TextEmbeddingCache, TextTower
from ..train.config import StageConfig
from ..run import RunDir
from ..train.stage import Stage
from .ae import autoencoder_genes, iter_heldout, load_autoencoder


@dataclass
class ClopModelConfig:
    text_model: str = "minilm"  # "minilm" (ships offline), a local path, or an HF id (BiomedBERT on clusters)
    trainable_layers: int = 0  # last N text-tower layers trained; 0 = frozen (cached caption features)
    max_length: int = 64
    embed_dim: int = 256
    hidden: int = 512
    loss: str = "infonce"  # infonce or siglip
    text_head: str = "linear"  # linear or mlp projection of text features
    normalize_text: bool = True  # L2-normalise pooled text-tower features
    captions_per_condition: int = 48  # size of the caption bank per training condition (frozen tower)
    # std of Gaussian noise added to text features in training, so the text head stays smooth
    # around the bank's captions and unseen wordings land with their synonyms (CapDec's
    # noise injection: Nukrai et al., 2022, "Text-Only Training for Image Captioning using
    # Noise-Injected CLIP", EMNLP Findings). 0.02 per dimension of unit-norm MiniLM features
    # raised held-out reworded zero-shot from 0.56 to 0.83 (direct) in the demo; see README.
    text_noise: float = 0.02
    prompt_anchor_k: int = 8  # at inference, blend in the k nearest bank captions (0: off); see ConditionEncoder
    prompt_anchor_tau: float = 0.02
    n_markers: int = 3

    def text_tower(self) -> TextTower:
        """The text tower this config names (frozen unless ``trainable_layers``)."""
        return TextTower(self.text_model, trainable_layers=self.trainable_layers, max_length=self.max_length,
                         normalize=self.normalize_text)


@dataclass
class ClopStageConfig(StageConfig):
    model: ClopModelConfig = field(default_factory=ClopModelConfig)


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


class CaptionBank:
    """``per_condition`` augmented captions for every training condition, with their text
    features; ``sample`` picks one per cell."""

    def __init__(self, keys: list[str], captions: list[str], features: torch.Tensor, owner: np.ndarray):
        self.keys, self.captions, self.features, self.owner = keys, captions, features, owner
        self.rows = {k: np.flatnonzero(owner == i) for i, k in enumerate(keys)}

    @classmethod
    def build(cls, builder: CaptionBuilder, conditions: list[dict], per_condition: int, tower: TextTower,
              seed: int) -> "CaptionBank":
        rng = np.random.default_rng([seed, 77])
        keys, captions, owner = [], [], []
        for i, meta in enumerate(conditions):
            keys.append(builder.condition_key(meta))
            texts = [builder.canonical(meta)] + [builder.augment(meta, rng) for _ in range(per_condition - 1)]
            captions += texts
            owner += [i] * len(texts)
        return cls(keys, captions, tower.embed(captions).float().cpu(), np.array(owner))

    def save(self, path: str) -> None:
        torch.save({"keys": self.keys, "captions": self.captions, "features": self.features,
                    "owner": torch.from_numpy(self.owner)}, path)

    @classmethod
    def load(cls, path: str) -> "CaptionBank":
        d = torch.load(path, weights_only=True)
        return cls(d["keys"], d["captions"], d["features"], d["owner"].numpy())

    def sample(self, keys: list[str], rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        missing = sorted({k for k in keys if k not in self.rows})
        if missing:
            raise KeyError(f"conditions {missing[:5]} have no captions in the bank (they are not in the training "
                           "split's manifest); rebuild the shards or the bank")
        rows = np.array([self.rows[k][rng.integers(len(self.rows[k]))] for k in keys])
        return self.features[rows], rows


def shared_caption_bank(path: str, builder, conditions, per_condition, tower, seed, rank: int) -> CaptionBank:
    """Rank 0 builds (or reuses) the bank file; the other ranks load it."""
    if rank == 0 and not os.path.exists(path):
        bank = CaptionBank.build(builder, conditions, per_condition, tower, seed)
        bank.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()
    return CaptionBank.load(path)


class ConditionEncoder:
    """Text → DiT condition: frozen text tower, then CLOP's text projection (unit norm).

    With a caption bank, a prompt is also *anchored*: its nearest training captions in the
    frozen tower's own space (top ``anchor_k``, softmax weights at temperature
    ``anchor_tau``) contribute their projected embeddings, and the condition is the
    normalised sum of the direct and the anchored embedding. The tower's space is where
    unseen synonyms land near seen ones; the anchored part keeps the condition on the
    embeddings the DiT was trained with.
    """

    def __init__(self, tower: TextTower, clop: CLOP, builder: CaptionBuilder, mode: str,
                 bank: CaptionBank | None = None, anchor_k: int = 0, anchor_tau: float = 0.02):
        self.tower, self.clop, self.builder, self.mode = tower, clop, builder, mode
        self.anchor_k, self.anchor_tau = anchor_k, anchor_tau
        self._cache = TextEmbeddingCache(tower) if tower.frozen else None  # prompts repeat across calls
        self._bank_raw = self._bank_proj = None
        if bank is not None and anchor_k > 0:
            self._bank_raw = torch.nn.functional.normalize(bank.features.float(), dim=-1)
            self._bank_proj = self.project(bank.features).cpu()

    @property
    def num_fields(self) -> int:
        return 1 if self.mode == "caption" else len(CAPTION_FIELDS)

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        dev = next(self.clop.parameters()).device
        return self.clop.encode_text(features.to(dev).float()).float()

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        """(N, tower.dim) text-tower features on the CPU, memoised when the tower is frozen."""
        return (self._cache.encode(texts) if self._cache is not None else self.tower.embed(texts)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, embed_dim) projected (and, with a bank, anchored) text embeddings."""
        feats = self.features(texts)
        direct = self.project(feats).cpu()
        if self._bank_raw is None:
            return direct
        sims = torch.nn.functional.normalize(feats, dim=-1) @ self._bank_raw.T
        top = sims.topk(min(self.anchor_k, sims.shape[1]), dim=1)
        w = torch.softmax(top.values / self.anchor_tau, dim=1)
        anchored = (w[..., None] * self._bank_proj[top.indices]).sum(1)
        return torch.nn.functional.normalize(direct + torch.nn.functional.normalize(anchored, dim=-1), dim=-1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, K, embed_dim) conditions of free-text prompts. In field mode a prompt is parsed
        as "cell type: X; tissue: Y; disease: Z"; a missing field is left to the null."""
        if self.mode == "caption":
            return self.encode_texts(prompts)[:, None]
        parsed = [parse_fields(p) for p in prompts]
        texts = [f"{FIELD_NAMES[f]}: {p.get(f, '')}" for p in parsed for f in CAPTION_FIELDS]
        emb = self.project(self.features(texts))
        return emb.view(len(prompts), len(CAPTION_FIELDS), -1)

    @staticmethod
    def missing_fields(prompts: list[str]) -> torch.Tensor:
        """(P, K) True where a field-mode prompt leaves a field out."""
        return torch.tensor([[f not in parse_fields(p) for f in CAPTION_FIELDS] for p in prompts])


def load_condition_encoder(run: RunDir, mode: str, device) -> ConditionEncoder:
    """The frozen text side of a run's CLOP stage."""
    from ..config import load_config

    ccfg = load_config(ClopStageConfig, run.config_path("clop"))
    m = ccfg.model
    tower = m.text_tower()
    state = run.load_weights("clop")
    ae_dim = next(v for k, v in state.items() if k.startswith("clop.cell_proj.0.weight")).shape[1]
    clop = CLOP(tower.dim, ae_dim, embed_dim=m.embed_dim, hidden=m.hidden, loss=m.loss, text_head=m.text_head)
    clop.load_state_dict({k[len("clop."):]: v for k, v in state.items() if k.startswith("clop.")})
    tower_state = {k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")}
    if tower_state:
        tower.load_state_dict(tower_state)
    tower.eval().requires_grad_(False)
    clop.eval().requires_grad_(False).to(device)
    builder = CaptionBuilder.from_manifest(run.manifest(), n_markers=m.n_markers)
    bank_path = os.path.join(run.stage_dir("clop"), "caption_bank.pt")
    bank = CaptionBank.load(bank_path) if mode == "caption" and m.prompt_anchor_k > 0 and os.path.exists(bank_path) \
        else None
    return ConditionEncoder(tower, clop, builder, mode, bank, m.prompt_anchor_k, m.prompt_anchor_tau)


class ClopStage(Stage):
    name = "clop"

    def fields(self):
        return ("cell_type", "tissue_general", "disease", "dataset_id")

    def genes(self, run: RunDir):
        return autoencoder_genes(run)

    def setup(self, run: RunDir, loader, device) -> None:
        m = self.cfg.model
        self.device = device
        self.ae, _ = load_autoencoder(run, device)
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
        clop = CLOP(self.tower.dim, self.ae.cfg.latent_dim, embed_dim=m.embed_dim, hidden=m.hidden, loss=m.loss,
                    text_head=m.text_head)
        return ClopTrainModule(clop, None if self.tower.frozen else self.tower)

    def loss(self, model, batch, generator):
        counts = batch["counts"].to(self.device)
        with torch.no_grad():
            z = self.ae.encode(counts)
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
        cells, types, studies, conds = [], [], [], []
        for batch in iter_heldout(d.shards, d.eval_split, self.genes(run), d.eval_cells,
                                  fields=("cell_type", "tissue_general", "disease", "dataset_id")):
            z = self.ae.encode(batch["counts"].to(device))
            cells.append(clop.encode_cell(z).cpu())
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
        metas = {k: dict(zip(CAPTION_FIELDS, k.split("|"))) for k in sorted(set(conds))}
        cond_text = encoders[""].encode_texts([self.builder.canonical(m) for m in metas.values()])
        out["retrieval"] = text_to_cell_recall(cond_text.cpu(), list(metas), cell_emb, conds)
        out["knn_study_entropy"] = knn_study_entropy(cell_emb, studies) if len(set(studies)) > 1 else None
        out["paraphrase_gap"] = out["zero_shot_canonical"]["accuracy"] - out["zero_shot_paraphrase"]["accuracy"]
        return out

    def export(self, state_dict, run: RunDir) -> None:
        if self.tower.frozen:  # the tower is named in the config, not copied
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("tower.")}
        run.save_weights(self.name, state_dict)
