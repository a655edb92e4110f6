"""CLOP: contrastive language-omics pretraining, stage 1 of CLOP-DiT.

Two small towers map a caption's text-model features and a cell's frozen autoencoder
latent z into one unit sphere, trained so that a cell and its caption meet:

* InfoNCE, symmetric, as CLIP (Radford et al., 2021, "Learning Transferable Visual Models
  From Natural Language Supervision", ICML), with a learnable temperature stored as
  ``log(1/T)`` and clamped at ``log(100)``.
* Or the sigmoid loss of SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image
  Pre-Training", ICCV), with learnable temperature and bias.

CLOP-DiT (Fu, 2026, bioRxiv 10.64898/2026.03.26.714457) aligned BiomedBERT text and scGPT
cell embeddings this way. Unlike images and their alt-texts, many cells share one condition
(cell type | tissue | disease), so targets are multi-positive: cells with the same
condition key are positives of each other, never negatives.

Distribution follows open_clip's ``loss.py`` (Ilharco et al., 2021): features are gathered
from every rank with gradients (``torch.distributed.nn.functional.all_gather``, which works
over gloo and NCCL), and each rank computes the "local loss" of its own rows against all
gathered columns. Normalisation: rank r's loss is ``world_size / N`` times the sum of its
per-row losses, N the global batch. With equal local batches that is the mean over its
rows; for any split, the mean of the rank losses (what DeepSpeed/DDP optimise when they
average gradients) is exactly the one-process loss on the concatenated batch, and so are
its parameter gradients. (A rank's *input* gradients are those of the sum of the rank
losses, i.e. ``world_size`` times the one-process ones, because the gather's backward sums
over ranks; the average over ranks then restores the parameter gradients.)

The cell encoder (frozen stage-0 autoencoder) and the text tower are not inside
:class:`CLOP`: it takes z and text features, so they can be precomputed or composed by the
trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if dist.is_available():
    from torch.distributed.nn.functional import all_gather as _all_gather_with_grad

MAX_LOGIT_SCALE = math.log(100.0)
LOSSES = ("infonce", "siglip")


#################################################################################
#                              Gathering across ranks                           #
#################################################################################

def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_features(features, keys: torch.Tensor):
    """All ranks' rows, in rank order, with gradients flowing back to each rank's features.

    Parameters
    ----------
    features
        A (B, D) tensor or a tuple of them (gathered in one collective).
    keys
        (B,) int64 condition ids, gathered without gradient.

    Returns
    -------
    (features gathered like the input, keys gathered). Identity outside
    ``torch.distributed`` or with one rank. Ranks may hold different numbers of rows.
    """
    world = _world()
    if world == 1:
        return features, keys
    single = isinstance(features, torch.Tensor)
    keys = keys.to((features if single else features[0]).device)
    parts = (features,) if single else tuple(features)
    widths = [p.shape[1] for p in parts]
    flat = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    n = torch.tensor([flat.shape[0]], dtype=torch.int64, device=flat.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - flat.shape[0]
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
        keys = F.pad(keys, (0, pad))
    gathered = _all_gather_with_grad(flat)
    key_list = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(key_list, keys.contiguous())
    flat_all = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
    keys_all = torch.cat([k[:s] for k, s in zip(key_list, sizes)])
    out = torch.split(flat_all, widths, dim=1)
    return (out[0] if single else tuple(out)), keys_all


def positive_mask(keys_local: torch.Tensor, keys_all: torch.Tensor) -> torch.Tensor:
    """(b, N) bool: local row i and global column j share a condition key."""
    return keys_local[:, None] == keys_all[None, :]


def multi_positive_targets(keys_local: torch.Tensor, keys_all: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Row-normalised positive mask: each row spreads probability 1 over its positives."""
    pos = positive_mask(keys_local, keys_all).to(dtype)
    return pos / pos.sum(1, keepdim=True).clamp(min=1.0)


def _scale(logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


#################################################################################
#                                    Losses                                     #
#################################################################################

class ContrastiveLoss(nn.Module):
    """Symmetric multi-positive InfoNCE over local rows x gathered columns.

    ``loss = 0.5 * (CE(c2t) + CE(t2c))``, with soft targets from :func:`multi_positive_targets`,
    ``logits_c2t = s * cell_local @ text_all.T`` and ``logits_t2c = s * text_local @ cell_all.T``,
    ``s = exp(min(logit_scale, log 100))``. With one positive per row this is CLIP's loss.
    """

    def forward(self, cell_emb, text_emb, logit_scale, keys):
        (cell_all, text_all), keys_all = gather_features((cell_emb, text_emb), keys)
        return self.local_loss(cell_emb, text_emb, cell_all, text_all, keys, keys_all, logit_scale)

    @staticmethod
    def local_loss(cell, text, cell_all, text_all, keys, keys_all, logit_scale, logit_bias=None):
        s = _scale(logit_scale)
        targets = multi_positive_targets(keys, keys_all, cell.dtype)
        c2t = -(targets * F.log_softmax(s * cell @ text_all.T, dim=1)).sum()
        t2c = -(targets * F.log_softmax(s * text @ cell_all.T, dim=1)).sum()
        return 0.5 * (c2t + t2c) * (_world() / cell_all.shape[0])


class SigLipLoss(nn.Module):
    """Sigmoid loss: every (cell, caption) pair is a binary problem, label +1 when the keys
    match and -1 otherwise; ``-sum log sigmoid(label * (s * cos + b))`` over local rows x
    gathered columns, divided by the number of global rows (SigLIP's normalisation)."""

    def forward(self, cell_emb, text_emb, logit_scale, logit_bias, keys):
        (cell_all, text_all), keys_all = gather_features((cell_emb, text_emb), keys)
        return self.local_loss(cell_emb, text_emb, cell_all, text_all, keys, keys_all, logit_scale, logit_bias)

    @staticmethod
    def local_loss(cell, text, cell_all, text_all, keys, keys_all, logit_scale, logit_bias=None):
        logits = _scale(logit_scale) * cell @ text_all.T + logit_bias
        labels = 2.0 * positive_mask(keys, keys_all).to(cell.dtype) - 1.0
        return -F.logsigmoid(labels * logits).sum() * (_world() / cell_all.shape[0])


#################################################################################
#                                     CLOP                                      #
#################################################################################

def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class CLOP(nn.Module):
    """Text and cell projection heads and the contrastive loss between them.

    Parameters
    ----------
    text_dim
        Width of the text tower's features (384 for MiniLM, 768 for BiomedBERT).
    latent_dim
        Width of the frozen autoencoder latent z.
    embed_dim, hidden
        Shared embedding width; hidden width of the MLPs (Linear-GELU-Linear).
    loss
        "infonce" (CLIP) or "siglip".
    init_logit_scale
        Initial log temperature; default log(1/0.07) for InfoNCE (CLIP), log(10) for
        SigLIP (Zhai et al.).
    init_logit_bias
        SigLIP's initial bias (-10 in the paper); unused by InfoNCE.
    text_head
        "mlp" or "linear" projection of the text features.

    Examples
    --------
    >>> clop = CLOP(text_dim=384, latent_dim=256)
    >>> loss, metrics = clop(z, text_features, keys)  # keys: int64 condition ids
    """

    def __init__(self, text_dim: int, latent_dim: int, embed_dim: int = 256, hidden: int = 512,
                 loss: str = "infonce", init_logit_scale: float | None = None, init_logit_bias: float = -10.0,
                 text_head: str = "mlp"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: choose one of {LOSSES}")
        if text_head not in ("mlp", "linear"):
            raise ValueError(f"text_head={text_head!r}: choose 'mlp' or 'linear'")
        self.loss_name = loss
        # A linear text head (CLIP's choice) keeps the text tower's neighbourhoods, so wordings
        # never seen in training land near their synonyms; an MLP fits training wordings tighter.
        self.text_proj = (_mlp(text_dim, hidden, embed_dim) if text_head == "mlp"
                          else nn.Sequential(nn.Linear(text_dim, embed_dim)))
        self.cell_proj = _mlp(latent_dim, hidden, embed_dim)
        if init_logit_scale is None:
            init_logit_scale = math.log(1 / 0.07) if loss == "infonce" else math.log(10.0)
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))  # 1-d: DeepSpeed cannot broadcast 0-d
        if loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))
            self.loss_fn = SigLipLoss()
        else:
            self.logit_bias = None
            self.loss_fn = ContrastiveLoss()

    def encode_text(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_features), dim=-1)

    def encode_cell(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.cell_proj(z), dim=-1)

    def forward(self, z: torch.Tensor, text_features: torch.Tensor, keys: torch.Tensor):
        """Loss and metrics of a (local) batch: ``z`` (B, latent_dim), ``text_features``
        (B, text_dim), ``keys`` (B,) int64 condition ids.

        Returns ``(loss, {"logit_scale", "pos_sim", "neg_sim"})``; the metrics are detached
        floats over this rank's rows against all gathered captions (NaN when a batch has no
        positive / no negative pair).
        """
        # the loss runs in at least fp32 (bf16 engines), float64 stays float64
        cell, text = self.encode_cell(z), self.encode_text(text_features)
        wide = torch.promote_types(cell.dtype, torch.float32)
        cell, text = cell.to(wide), text.to(wide)
        (cell_all, text_all), keys_all = gather_features((cell, text), keys)
        loss = self.loss_fn.local_loss(cell, text, cell_all, text_all, keys, keys_all, self.logit_scale,
                                       self.logit_bias)
        with torch.no_grad():
            sim = cell @ text_all.T
            pos = positive_mask(keys, keys_all)
            metrics = {"logit_scale": float(_scale(self.logit_scale)),
                       "pos_sim": float(sim[pos].mean()) if pos.any() else float("nan"),
                       "neg_sim": float(sim[~pos].mean()) if (~pos).any() else float("nan")}
            if self.logit_bias is not None:
                metrics["logit_bias"] = float(self.logit_bias)
        return loss, metrics


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

    def text_tower(self):
        """The text tower this config names (frozen unless ``trainable_layers``)."""
        from .text import TextTower

        return TextTower(self.text_model, trainable_layers=self.trainable_layers, max_length=self.max_length,
                         normalize=self.normalize_text)

    def build(self, text_dim: int, latent_dim: int) -> CLOP:
        return CLOP(text_dim, latent_dim, embed_dim=self.embed_dim, hidden=self.hidden, loss=self.loss,
                    text_head=self.text_head)
