"""Marker genes in a prompt -> the cell types that express them, from a model's own training cells.

A biologist often names a cell by its markers instead of its type: "SCGB1A1+ cells from the lung",
"markers: MS4A1, CD79A", "CD34-high cells, CD38 low", "FCGR3A+ CD14- monocytes". :class:`MarkerTable`
holds, for each cell type of a model, how much above or below the other types it expresses each gene
(z-scores across types of the log mean expression of its training cells, as a marker table ranks
genes, e.g. scanpy's ``rank_genes_groups``); :meth:`MarkerTable.cell_types` reads the gene symbols a
prompt names (with "+", "high" / "-", "low", "negative" after them) and returns the types that express
them most. The prompt resolver uses it only where the prompt names no cell type in words.

Built from a run with :meth:`MarkerTable.of_run`: from the pseudobulk expression of each type's
training cells that the DiT stage writes to ``latent_stats.json`` (``type_expression``); for a run
made before it did, from each library-size group's mean latent decoded by the run's codec (as good
as the codec: 30 of 31 types named by their own first two atlas markers with the demo's
autoencoder, fewer with a 16-component PCA codec).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch

# a type is named by markers when its mean z-score over the named genes is at least MIN_SCORE; every type
# within MARGIN of the best is kept as a candidate (MS4A1 names naive and memory B cells alike)
MIN_SCORE = 1.5
MARGIN = 0.5
_TOKEN = re.compile(r"[^\s,;:()\[\]/_]+")
_GLUED = re.compile(r"(?<=[+-])(?=[A-Za-z])")  # "CD19+CD27-" -> "CD19+", "CD27-" (not "HLA-DR": "HLA-" is no gene)
_UP = {"+", "high", "hi", "positive", "pos", "bright", "++"}
_DOWN = NEGATIVE_SIGNS = frozenset({"-", "low", "lo", "negative", "neg", "dim", "--"})  # the resolver's too
MARKER_SIGNS = frozenset(_UP) | NEGATIVE_SIGNS  # words after a symbol that say its sign
# suffixes glued to a symbol ("CD14-", "FCGR3A-high", "CD34hi"), longest first
_SUFFIXES = sorted({(f"{sep}{w}", sign) for sep in ("", "-", "_") for ws, sign in ((_UP, 1), (_DOWN, -1))
                    for w in ws if sep == "" or w.isalpha()}, key=lambda x: -len(x[0]))


@functools.cache
def _protein_aliases() -> dict[str, str]:
    from ..data.conditions import vocab_file

    return {str(k).upper(): str(v) for k, v in vocab_file("protein_aliases").items()}


class MarkerTable:
    """Per cell type (rows, ``labels``) and gene symbol (columns, ``symbols``), the z-score across the
    types of the type's log mean expression of the gene."""

    def __init__(self, labels: list[str], symbols: list[str], z: np.ndarray):
        self.labels, self.symbols, self.z = list(labels), list(symbols), np.asarray(z, np.float32)
        self._column = {s: j for j, s in enumerate(self.symbols)}

    @classmethod
    def from_expression(cls, labels: list[str], symbols: list[str], proportions: np.ndarray) -> "MarkerTable":
        """From each type's mean expression proportions (types, genes)."""
        logp = np.log(np.asarray(proportions, np.float64) + 1e-6)
        sd = logp.std(0)
        z = (logp - logp.mean(0)) / np.maximum(sd, 0.1)  # a gene flat across types scores near 0
        return cls(labels, symbols, z)

    @classmethod
    @torch.no_grad()
    def from_groups(cls, codec, groups: list[dict], symbols: list[str]) -> "MarkerTable":
        """From library-size groups with ``cell_type``, ``n`` and ``z_mean`` (the group's mean latent),
        decoded by ``codec`` (genes in ``symbols`` order)."""
        z = torch.tensor([g["z_mean"] for g in groups], dtype=torch.float32)
        p = codec.decode(z, torch.ones(len(groups)))["mu"].float().cpu().numpy()
        p /= p.sum(1, keepdims=True)
        labels = sorted({g["cell_type"] for g in groups})
        w = np.array([g["n"] for g in groups], float)
        types = np.array([g["cell_type"] for g in groups])
        mean = np.stack([np.average(p[types == t], axis=0, weights=w[types == t]) for t in labels])
        return cls.from_expression(labels, symbols, mean)

    @classmethod
    def of_run(cls, type_expression: dict | None, groups: list[dict], codec,
               symbols: list[str]) -> "MarkerTable | None":
        """A run's table: from its training cells' pseudobulk per type (``latent_stats.json``'s
        ``type_expression``), else (runs from before session 24) from its decoded group means; None
        where it has neither."""
        if type_expression:
            return cls.from_expression(list(type_expression), symbols, np.array(list(type_expression.values())))
        if groups and "z_mean" in groups[0]:
            return cls.from_groups(codec, groups, symbols)
        return None

    def symbol(self, token: str) -> tuple[str, int] | None:
        """``token`` as (gene symbol, sign): the symbol exactly, case included, and only in upper case or
        with a digit (an ordinary word is never a gene), with a glued suffix read as the sign ("CD14-",
        "FCGR3A-high", "CD34hi"; +1 without one); None for any other word."""
        word = token.rstrip(".")
        sign = 1
        if self._gene(word) is None:
            for suffix, s in _SUFFIXES:
                if word.lower().endswith(suffix) and self._gene(word[: -len(suffix)]) is not None:
                    word, sign = word[: -len(suffix)], s
                    break
        gene = self._gene(word)
        return None if gene is None else (gene, sign)

    def _gene(self, word: str) -> str | None:
        """The symbol ``word`` is: exactly, in upper case or with a digit; or, with a digit and a capital, in
        another case as protein names write it ("CD1c", "Cd14"; all lower case is a word); or the gene a
        protein name with a capital stands for ("CD16": FCGR3A, ``vocab/protein_aliases.yaml``)."""
        if word in self._column:
            return word if word.isupper() or any(c.isdigit() for c in word) else None
        if any(c.isdigit() for c in word) and any(c.isupper() for c in word) and word.upper() in self._column:
            return word.upper()
        gene = _protein_aliases().get(word.upper()) if any(c.isupper() for c in word) else None
        return gene if gene in self._column else None

    def tokens(self, text: str) -> list[str]:
        """``text``'s words as :meth:`symbol` reads them: split at spaces, punctuation and "_" ("Mono_CD16"),
        and markers glued together split apart ("CD19+CD27-"), where each piece is one."""
        out = []
        for tok in _TOKEN.findall(text):
            pieces = _GLUED.split(tok)
            out += pieces if len(pieces) > 1 and all(self.symbol(p) is not None for p in pieces) else [tok]
        return out

    def mentions(self, prompt: str) -> list[tuple[str, int]]:
        """The gene symbols ``prompt`` names (:meth:`symbol`), each with +1 (expressed, the default) or
        -1 ("CD14-", "CD14 low")."""
        tokens = self.tokens(prompt)
        out = []
        for i, tok in enumerate(tokens):
            found = self.symbol(tok)
            if found is None:
                continue
            word, sign = found
            after = tokens[i + 1].lower().rstrip(".") if i + 1 < len(tokens) else ""
            if after in _DOWN:
                sign = -1
            elif after in _UP:
                sign = 1
            out.append((word, sign))
        return list(dict.fromkeys(out))

    def scores(self, mentions: list[tuple[str, int]]) -> np.ndarray:
        """Each type's mean z-score over the genes said expressed, less the mean z above 0 of the genes said
        absent: a gene said absent counts against the types that express it and for none that lack it (a type
        is not named by what it lacks: stem cells lack FCGR3A as classical monocytes do)."""
        up = [self._column[g] for g, s in mentions if s > 0]
        down = [self._column[g] for g, s in mentions if s < 0]
        score = self.z[:, up].mean(1) if up else np.zeros(len(self.labels), np.float32)
        return score - (np.maximum(self.z[:, down], 0).mean(1) if down else 0.0)

    def cell_types(self, prompt: str, vocab: list[str] | None = None,
                   min_score: float = MIN_SCORE) -> tuple[list[str], float, str] | None:
        """The types (of ``vocab``, if given) the prompt's markers name: every type within
        :data:`MARGIN` of the best score (:meth:`scores`) where the best reaches ``min_score``, with that
        score and the genes read; None where the prompt names no expressed gene or no type stands out.
        Among the few types a prompt already names ("FCGR3A+ CD14- monocytes") the markers only have
        to tell them apart: pass a lower ``min_score`` (0 or less), and a gene said absent is enough ("CD27- B
        cells": the B cells that do not express it)."""
        mentions = self.mentions(prompt)
        if not any(s > 0 for _, s in mentions) and not (mentions and vocab is not None and min_score <= 0):
            return None
        score = self.scores(mentions)
        allowed = np.array([vocab is None or t in vocab for t in self.labels])
        score = np.where(allowed, score, -np.inf)
        best = float(score.max())
        if best < min_score:
            return None
        keep = [self.labels[i] for i in np.argsort(-score) if score[i] >= best - MARGIN]
        said = ", ".join(f"{g}{'+' if s > 0 else '-'}" for g, s in mentions)
        return keep, best, said
