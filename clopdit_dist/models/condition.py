"""Text → DiT condition: the frozen text side of a run's CLOP stage, with its caption bank.

:class:`CaptionBank` holds augmented captions of every training condition with their
frozen-tower features (built once by the CLOP stage, reused by the DiT stage and by prompt
anchoring); :class:`ConditionEncoder` turns prompts into the conditions the DiT was
trained on; :func:`load_condition_encoder` rebuilds it from a run directory.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np
import torch
import torch.distributed as dist

from ..config import load_config_section
from ..data.captions import CaptionBuilder
from ..data.conditions import CONDITION_FIELDS, FIELD_NAMES, parse_fields
from ..errors import PromptError
from ..run import RunDir
from .clop import CLOP, ClopModelConfig
from .text import TextEmbeddingCache, TextTower


class CaptionBank:
    """``per_condition`` augmented captions for every training condition, with their text
    features; ``sample`` picks one per cell."""

    def __init__(self, keys: list[str], captions: list[str], features: torch.Tensor, owner: np.ndarray):
        self.keys, self.captions, self.features, self.owner = keys, captions, features, owner
        self.rows = {k: np.flatnonzero(owner == i) for i, k in enumerate(keys)}

    @staticmethod
    def draw(builder: CaptionBuilder, conditions: list[dict], per_condition: int,
             seed: int) -> tuple[list[str], list[str], np.ndarray]:
        """The bank's condition keys, its captions (each condition's canonical one, then
        ``per_condition - 1`` augmented) and each caption's condition index."""
        rng = np.random.default_rng([seed, 77])
        keys, captions, owner = [], [], []
        for i, meta in enumerate(conditions):
            keys.append(builder.condition_key(meta))
            texts = [builder.canonical(meta)] + [builder.augment(meta, rng) for _ in range(per_condition - 1)]
            captions += texts
            owner += [i] * len(texts)
        return keys, captions, np.array(owner)

    @classmethod
    def build(cls, builder: CaptionBuilder, conditions: list[dict], per_condition: int, tower: TextTower,
              seed: int) -> "CaptionBank":
        keys, captions, owner = cls.draw(builder, conditions, per_condition, seed)
        return cls(keys, captions, embed_across_ranks(tower, captions), owner)

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


def embed_across_ranks(tower: TextTower, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """``tower.embed(texts)`` as float32 on the CPU, its batches dealt round-robin to the ranks
    and gathered. Each batch is the one a single process would run, so the numbers are the
    same bit for bit; each rank runs 1/world of the batches."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    starts = range(0, len(texts), batch_size)
    mine = {k: tower.embed(texts[i:i + batch_size], batch_size).float().cpu()
            for k, i in enumerate(starts) if k % world == rank}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    return torch.cat([mine[k] for k in range(len(starts))]) if texts else torch.empty(0, tower.dim)


def shared_caption_bank(path: str, builder, conditions, per_condition, tower, seed, rank: int) -> CaptionBank:
    """Every rank embeds its share of the bank (:func:`embed_across_ranks`) and rank 0 writes
    the file, unless rank 0 finds it there already; then every rank loads it."""
    build = [rank == 0 and not os.path.exists(path)]
    if dist.is_initialized():  # rank 0's answer for all: a rank that looked later could see the new file
        dist.broadcast_object_list(build, src=0)
    if build[0]:
        bank = CaptionBank.build(builder, conditions, per_condition, tower, seed)
        if rank == 0:
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
                 bank: CaptionBank | None = None, anchor_k: int = 0, anchor_tau: float = 0.02,
                 field_encoding: str = "text"):
        self.tower, self.clop, self.builder, self.mode = tower, clop, builder, mode
        if field_encoding not in FIELD_ENCODINGS:
            raise ValueError(f"field_encoding={field_encoding!r}: choose one of {FIELD_ENCODINGS}")
        self.field_encoding = field_encoding
        self.anchor_k, self.anchor_tau = anchor_k, anchor_tau
        self._cache = TextEmbeddingCache(tower) if tower.frozen else None  # prompts repeat across calls
        self._bank_raw = self._bank_proj = None
        if bank is not None and anchor_k > 0:
            self._bank_raw = torch.nn.functional.normalize(bank.features.float(), dim=-1)
            self._bank_proj = self.project(bank.features).cpu()

    @property
    def num_fields(self) -> int:
        return 1 if self.mode == "caption" else len(CONDITION_FIELDS)

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
        check_prompts(prompts)
        if self.mode == "caption":
            return self.encode_texts(prompts)[:, None]
        return self.encode_fields([parse_fields(p) for p in prompts])

    @property
    def dim(self) -> int:
        return self.clop.text_proj[-1].out_features

    @torch.no_grad()
    def encode_fields(self, conditions: list[dict]) -> torch.Tensor:
        """(P, K, dim) field-mode conditions of (partial) condition dicts. ``field_encoding``
        "code": each value's fixed random code (:func:`field_code`), so the DiT's per-field
        layer learns one embedding per value, as a lookup table would; "text": the value's
        canonical text (:func:`field_text`) through the tower and CLOP's text head, which
        keeps near-synonymous labels near each other; "text+code": both (:func:`mix_field_codes`).
        A missing field gets the code/text of an empty value; the generator drops it to the
        learned null."""
        if self.field_encoding == "code":
            codes = [field_code(f, c.get(f) or "", self.dim) for c in conditions for f in CONDITION_FIELDS]
            return torch.stack(codes).view(len(conditions), len(CONDITION_FIELDS), -1)
        texts = [field_text(f, c.get(f) or "") for c in conditions for f in CONDITION_FIELDS]
        emb = self.project(self.features(texts)).view(len(conditions), len(CONDITION_FIELDS), -1)
        return mix_field_codes(emb, conditions) if self.field_encoding == "text+code" else emb



def load_condition_encoder(run: RunDir, mode: str, latent_dim: int, device,
                           field_encoding: str = "text") -> ConditionEncoder:
    """The frozen text side of a run's CLOP stage."""
    m = load_config_section(ClopModelConfig, run.config_path("clop"), "model")
    tower = m.text_tower()
    state = run.load_weights("clop")
    clop = m.build(tower.dim, latent_dim)
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
    return ConditionEncoder(tower, clop, builder, mode, bank, m.prompt_anchor_k, m.prompt_anchor_tau, field_encoding)


FIELD_ENCODINGS = ("code", "text", "text+code")


@functools.cache
def field_code(field: str, value: str, dim: int) -> torch.Tensor:
    """A fixed unit vector per (field, value), seeded by a stable hash of both: with a few
    hundred values in 256 dimensions the codes are nearly orthogonal, so a linear layer on
    them is an embedding table (CFGen and scLDM embed each attribute value this way), one
    that needs no vocabulary file: the value's name is its index."""
    seed = int.from_bytes(hashlib.blake2b(f"{field}={value}".encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(seed % (2**63))
    return torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)


def mix_field_codes(emb: torch.Tensor, conditions: list[dict]) -> torch.Tensor:
    """(P, K, dim) unit text embeddings of field values plus each value's unit code
    (:func:`field_code`), renormalised. Two labels whose texts are nearly the same ("classical
    monocyte" / "non-classical monocyte": cosine 0.98 through CLOP's head) end up at about half
    that similarity, so the DiT can tell them apart, while labels of like meaning stay nearer
    each other than unrelated ones, which the code alone would not keep."""
    codes = torch.stack([field_code(f, c.get(f) or "", emb.shape[-1]) for c in conditions for f in CONDITION_FIELDS])
    return torch.nn.functional.normalize(emb + codes.view_as(emb).to(emb), dim=-1)


def field_text(field: str, value: str) -> str:
    """The one text a field value is conditioned on in field mode, e.g. "cell type: mast cell"."""
    return f"{FIELD_NAMES[field]}: {value}"


def field_banks(tower: TextTower, conditions: list[dict]) -> dict[str, CaptionBank]:
    """Per field, a bank of one canonical text per training value (:func:`field_text`)."""
    banks = {}
    for f in CONDITION_FIELDS:
        values = sorted({c[f] for c in conditions})
        texts = [field_text(f, v) for v in values]
        keys = [CaptionBuilder.condition_key({f: v}) for v in values]
        banks[f] = CaptionBank(keys, texts, tower.embed(texts).float().cpu(), np.arange(len(values)))
    return banks


def check_prompts(prompts: list[str]) -> None:
    """Refuse a prompt with no word in it: it names no cell, and the model would answer with
    whatever its null condition gives."""
    for p in prompts:
        if not isinstance(p, str) or not any(ch.isalnum() for ch in p):
            raise PromptError(f"prompt {p!r} names no cells; describe them in words, e.g. "
                              "'cell type: B cell; tissue: lung' or 'CD8 T cells from a lung tumour'")
