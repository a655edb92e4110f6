"""Free-text prompt -> condition fields, with the frozen text tower.

``PromptResolver(tower, vocab).resolve("CD8 T cells from a lung tumour")`` returns, per
condition field (cell type, tissue, disease), a label of that field's vocabulary (the
training labels) with a confidence, or None where the prompt does not name the field (the
generator then marginalises over it).

Method
------
1. Structured prompts: ``"key: value"`` pairs with a field key (:func:`parse_fields`:
   "cell type", "tissue", "disease") are resolved each against its own field only (the
   best span of the value). Other text (parts without a colon, pairs with another key such
   as "location: lung") is then resolved as free text for the fields still unnamed; pairs
   with an organism or marker key ("organism: human", "markers: CD8A") are ignored. Before that, URL escapes
   are decoded, a disease denied with its organ ("no lung disease") is said as no disease, and an ontology
   term id that is none of the labels' is written as its term's label (``_spelled_out``).
2. Free text: every word n-gram (1-6 words, within a ";"-separated part, not beginning or
   ending with a function word) is a candidate span. A span is scored against every name of
   every field -- the label, its TRAINING synonyms and generic rewrites
   (:func:`~clopdit_dist.data.conditions.train_names`) and the parent-group names of
   ``vocab/parents.yaml`` -- as 1.0 for an exact normalised match (case, accents, plurals,
   hyphens, "+"/"positive"; acronyms of <= 2 letters case-sensitively), also when the span
   equals a cell-type name once a group name inside it is swapped for another name of that
   group ("cytotoxic T lymphocyte" is "cytotoxic T cell": "T lymphocyte" and "T cell" name one
   group of ``parents.yaml``; :data:`SYNONYM_GROUP_FIELDS`), and otherwise as the cosine
   similarity of the frozen tower's embeddings of span and name (name embeddings computed
   once). Per field, the best-scoring span at or above the field's threshold wins, greedily
   by score over fields, no two fields on overlapping spans (a tissue inside a longer disease
   span is allowed: "lung cancer").
3. Parent names ("T cells", "B cell", "monocytes", "immune cells", "tumour") resolve to the
   group's children in the vocabulary, as ``candidates`` with equal weights (the prompt
   does not say which child; the generator can mix them, e.g. reweighted by the tissue's
   composition). ``fields`` then holds the child nearest the span in the tower's space (for
   code that wants one label) and ``confidence`` is ``GROUP_DISCOUNT * score / n_children``,
   below any leaf match's. A longer span around the group name that matches a child better
   than the group (e.g. "CD8-positive T lymphocyte" around "T lymphocyte") refines the group
   to that child. Why candidates rather than one leaf: "T cells" is a mixture, and picking
   the nearest leaf would silently generate CD4 T cells only.
4. Lists: names of one field joined by commas, "and" or "or" ("T cells from lung and liver",
   "B cells and plasma cells") are each taken, as ``candidates`` with equal weights (a group
   in the list contributes its children): :func:`~clopdit_dist.data.conditions.listed_matches`.
   Exact names only; "lung, not liver" stays one tissue.
5. Names the model lacks: the CELLxGENE Census labels of ``vocab/census_labels.yaml`` that
   are not in the vocabulary take part in step 2 with exact matches only. A field won by one
   ("kidney", "podocytes") is None and listed in ``unresolved`` / ``absent``, so the
   generator can say so instead of reading the name as the nearest label by meaning (the
   tower puts "kidney" at 0.62 from "liver", above the tissue threshold).
6. Assays ("10x 3' v3", "Smart-seq2"): read apart from the three fields, by exact names only
   (:mod:`~clopdit_dist.data.assay_names`), and their words taken out of the text the fields are
   read from; an "assay:" pair is read by its value. A prompt naming only an assay the model
   has is not empty: it asks for that assay's cells.

7. What the prompt asks for (:mod:`~clopdit_dist.data.prompt_scope`): free text is read in the order
   request sentences, other sentences, asides ("we already have X", "to compare with Y"; a tissue or
   disease only), so a name mentioned in passing does not win over the cell asked for; labels the prompt
   excludes ("but not the plasmacytoid type", "non-ciliated") leave a group or list it asks for
   (``ResolvedPrompt.excluded``); marker genes narrow a group it names ("FCGR3A+ CD14- monocytes").
8. A span that says a name with one word misspelt or clipped ("helthy", "livr", "alveloar macrophages",
   "lung adeno", "fibros"; Damerau-Levenshtein distance 1, 2 from eight letters on, one label per field, and
   a word the text tower does not know whole) scores :data:`TYPO_SCORE`, below an exact name.

The held-out "reworded" and "rare" tables are never read: they are the evaluation's wording.

Thresholds
----------
Chosen on the TRAINING side only by :func:`calibrate_thresholds` (never on held-out names):

* positives: every training name of every label (:func:`train_names`), scored whole
  against the field's names with every name of the same normalised form left out
  (leave-one-synonym-out), so only the cosine path can find the label;
* negatives: texts that do not name the field -- the other fields' training names and all
  candidate spans of training captions (``CaptionBuilder.augment``) of random vocabulary
  conditions with that field removed;
* the threshold maximises (positives with the right label at or above it - positives with
  a wrong label at or above it) / n_pos + (negatives below it) / n_neg, at the middle of
  the best interval.

On the synthetic atlas's vocabulary (31 cell types, 6 tissues, 5 diseases) with frozen
all-MiniLM-L6-v2 this gives the :data:`DEFAULT_THRESHOLDS`; at those values:

============  =====  =====  ======================  ======================  ==============
field         thr.   n pos  LOO right label, pass   LOO wrong label, pass   negatives pass
============  =====  =====  ======================  ======================  ==============
cell_type     0.666  141    0.667                   0.121                   0.017 of 579
tissue        0.600  26     0.808                   0.038                   0.034 of 1234
disease       0.553  22     0.727                   0.000                   0.022 of 1127
============  =====  =====  ======================  ======================  ==============

Generic words (context words, field keys, training template words, "cells") are no
candidate spans at all (:func:`~clopdit_dist.data.conditions.generic_words`): MiniLM puts
"cells" at 0.69 from "enterocyte" and "tissue" at 0.78 from "lung".
"""

from __future__ import annotations

import re
import urllib.parse

import numpy as np
import torch
from rapidfuzz.distance import DamerauLevenshtein

from ..data.assay_names import ASSAY_KEYS, AssaysNamed, assays_named
from ..data.conditions import (
    CONDITION_FIELDS,
    FIELD_KIND,
    FIELD_NAMES,
    LIST_WORDS,
    Match,
    NameEntry,
    PromptError,
    ResolvedPrompt,
    Span,
    TERM_ID,
    TYPO_SCORE,
    acronym_allowed,
    candidate_spans,
    expand_shared_heads,
    generic_words,
    has_words,
    listed_matches,
    normalize_name,
    prompt_error,
    put_right,
    resolver_names,
    select_matches,
    split_structured,
    train_names,
    train_tables,
    vocab_file,
    vocab_from_conditions,
)
from ..data.ontology import term_label
from ..data.prompt_scope import PromptScope, open_fields, read_scope, user_turns, with_context
from .marker_table import MARKER_SIGNS, MIN_SCORE, NEGATIVE_SIGNS
from .text import TextEmbeddingCache, TextTower

# Per-field thresholds: calibrate_thresholds(TextTower("minilm", normalize=True), <the
# synthetic atlas's vocabulary>) gave 0.6657, 0.5995, 0.5533 (training side only; see the
# module docstring). Recalibrate for another text tower or vocabulary.
DEFAULT_THRESHOLDS = {"cell_type": 0.666, "tissue_general": 0.600, "disease": 0.553}
# fields whose parent-group names are synonyms of one term, interchangeable inside a longer name: the
# cell-type groups' names are Cell Ontology synonyms ("T cell", "T lymphocyte"); the disease group's
# span broader and narrower terms ("neoplasm", "cancer"), so "lung tumour" stays the cancer group
SYNONYM_GROUP_FIELDS = ("cell_type",)
# "type I" / "group II" embedded as "type 1" / "group 2": the uncased tower reads a lone "i" as the pronoun, so
# "type I alveolar cells" was nearer "alveolar type 2 cell" (0.86) than any type-1 name
_ROMAN = {"I": "1", "II": "2", "III": "3"}
_ROMAN_TYPE = re.compile(r"\b(type|group|class)[\s-]+(III|II|I)\b", re.IGNORECASE)
# a "disease:" value that says there is none ("disease: none") means the label "normal"
NO_DISEASE_VALUES = frozenset({"none", "no", "nil", "absent"})
GROUP_DISCOUNT = 0.8  # confidence of a parent-group resolution relative to a leaf match
# an excluded text's list words: "neither CD8 nor Tregs", "plasma cells and memory cells"
_LIST_SPLIT = re.compile(r",|/|\b(?:and|or|nor)\b", re.IGNORECASE)
# a gene symbol with a negative sign glued to it ("CD14-", "CD3E-neg", "CD16low"): read by the marker table only
_NEGATED_GENE = re.compile(r"[A-Z][A-Z0-9]*\d[A-Z0-9]*(?:" + "|".join(
    re.escape(w) if not w.isalpha() else f"[-_]?{w}" for w in sorted(NEGATIVE_SIGNS, key=len, reverse=True)) + ")")
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")  # "tissue=skin%20of%20body", "CL%3A0000057"
# a disease denied with its organ or kind ("donors with no lung disease", "without liver disease", "free of any
# autoimmune disease"): a healthy donor, not the disease the organ's name is nearest
_NO_DISEASE_OF = re.compile(r"\b(no|without|w/o|free\s+of)\s+((?:any\s+|known\s+)*)((?:[A-Za-z][\w-]*\s+){1,2}?)"
                            r"(diseases?)\b", re.IGNORECASE)
# the proportions of a mixture, which say nothing of which cells: "70% classical and 30% non-classical monocytes", "in a
# 2:1 ratio", "a 1:1 mix of", "mostly"; "with some X" / "plus a sprinkling of X" add X to the list
_PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*%")
_RATIO = re.compile(r"\b(\d+(?:\s*:\s*\d+)+)\s+(?:ratio|mix(?:ture)?|split|proportion)\b", re.IGNORECASE)
_PROPORTION = re.compile(rf"{_PERCENT.pattern}(?:\s+of)?|\b(?:in\s+)?an?\s+{_RATIO.pattern[2:]}(?:\s+of)?"
                         r"|\b(?:mostly|mainly|predominantly|largely|chiefly)\b", re.IGNORECASE)
_SOME_MORE = re.compile(r"\b(?:with|plus)\s+(?:some|a\s+few|a\s+handful\s+of|a\s+sprinkling\s+of|a\s+minority\s+of|"
                        r"a\s+small\s+number\s+of|occasional|scattered)\s+", re.IGNORECASE)
# keys of "key: value" pairs that name no condition field: ignored
IGNORED_KEYS = frozenset({"organism", "species", "markers", "marker genes", "genes", "organism_ontology_term_id"})


def stated_shares(prompt: str, r: ResolvedPrompt, listed: list[Match]) -> dict[str, float]:
    """The shares of a mixture's cell types as ``prompt`` states them: its percentages ("70% classical and 30%
    non-classical monocytes"), else a ratio ("in a 2:1 ratio"), one number per listed type in the order they are
    named. Empty unless the listed types are leaves, exactly the prompt's candidates, and as many as the numbers."""
    labels = [m.entry.label for m in listed]
    if not labels or any(m.entry.group for m in listed) or len(set(labels)) != len(labels) \
            or {c for c, _ in r.candidates["cell_type"]} != set(labels):
        return {}
    numbers = [float(x) for x in _PERCENT.findall(prompt)]
    if not numbers:
        ratios = _RATIO.findall(prompt)
        numbers = [float(x) for x in ratios[0].split(":")] if len(ratios) == 1 else []
    if len(numbers) != len(labels) or sum(numbers) <= 0:
        return {}
    return {t: x / sum(numbers) for t, x in zip(labels, numbers)}


class PromptResolver:
    """Maps prompts to condition fields (see the module docstring).

    Parameters
    ----------
    tower
        A frozen :class:`~clopdit_dist.models.text.TextTower` (``TextTower("minilm")``).
    vocab
        Field -> its labels, e.g. ``{"cell_type": [...], "tissue_general": [...],
        "disease": [...]}`` (:func:`vocab_from_conditions` of the manifest's training
        conditions); a missing field has no labels and always resolves to None.
    thresholds
        Field -> minimum score (default :data:`DEFAULT_THRESHOLDS`).
    max_words
        Longest span, in words.
    ontology_ids
        Field -> label -> ontology term id (``Manifest.ontology_term_ids``): a prompt may name a
        label by its id ("CL:0000236", "cell_type_ontology_term_id: CL:0000236"), exactly.
    markers
        A :class:`~clopdit_dist.models.marker_table.MarkerTable` of the model's cell types: a prompt
        that names no cell type in words but names marker genes ("SCGB1A1+ cells") gets the types
        that express them (``ResolvedPrompt.markers`` says which genes were read).
    assays
        The Census assays of the model's training cells: an assay the prompt names
        (:func:`~clopdit_dist.data.assay_names.assays_named`) is given in ``ResolvedPrompt.assays``
        when the model has it, in ``assay_absent`` when not.
    """

    def __init__(self, tower: TextTower, vocab: dict[str, list[str]], thresholds: dict[str, float] | None = None,
                 max_words: int = 6, *, ontology_ids: dict[str, dict[str, str]] | None = None,
                 markers=None, assays: list[str] | None = None, _exclude: NameEntry | None = None):
        self.tower, self.markers, self.assays = tower, markers, list(assays or ())
        self._own_genes_of: dict[str, frozenset[str]] = {}
        self._generic = generic_words()
        self._subtypes = vocab_file("subtypes").get("cell_type") or {}
        self._unspecific = {f: frozenset(normalize_name(w) for w in vocab_file("unspecific").get(FIELD_KIND[f]) or ())
                            for f in CONDITION_FIELDS}
        self._not_sites = frozenset(normalize_name(n) for n in vocab_file("not_sites").get("tissue") or ())
        self.vocab = {f: [str(x) for x in vocab.get(f, ())] for f in CONDITION_FIELDS}
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.max_words = max_words
        # a disease whose label holds one tissue's label ("lung adenocarcinoma", "fatty liver disease"): its organ
        self._organ = {}
        for d in self.vocab["disease"]:
            words = f" {normalize_name(d)} "
            organs = [t for t in self.vocab["tissue_general"] if f" {normalize_name(t)} " in words]
            if len(organs) == 1:
                self._organ[d] = organs[0]
        self.entries: list[NameEntry] = resolver_names(self.vocab, ontology_ids)
        self._own_ids = {e.norm for e in self.entries if e.ontology_id}  # the labels' term ids, normalised
        self._cache = TextEmbeddingCache(tower) if tower.frozen else None
        self._field_of = np.array([e.field for e in self.entries])
        self._norms = [e.norm for e in self.entries]
        self._norm_array = np.array(self._norms, dtype=object)
        self._norm_index: dict[str, list[int]] = {}  # normalised name -> its entries
        for j, n in enumerate(self._norms):
            self._norm_index.setdefault(n, []).append(j)
        self._exact_field = {e.norm: e.field for e in self.entries if e.in_model and not e.ontology_id}
        # the words of the names a clipped or misspelt word may stand for (a model label's, shorthand and narrower
        # names too; not a Census label the model lacks, nor the thousands of ontology terms below its labels), and
        # the tower's whole-word vocabulary: a word it knows
        # ("lives", "long") is a word, not a misspelt name ("liver", "lung")
        self._words = {w.lower() for w in tower.tokenizer.get_vocab() if w.isalpha()}
        self._name_words = {w for e in self.entries if e.in_model and not e.acronym and not e.ontology_id
                            and not (e.from_ontology and e.narrower)
                            for w in e.norm.split() if w.isalpha()}
        self._fixes: dict[str, list[str]] = {}  # word -> the name words it may be clipped or misspelt from
        described = {normalize_name(n) for t in vocab_file("descriptions").values() for ns in t.values() for n in ns}
        self._names = {n for n in self._norms if n not in described}
        self._is_group = np.array([bool(e.group) for e in self.entries])
        self._exact_only = np.array([e.exact_only for e in self.entries])
        self._acronym = np.array([e.acronym for e in self.entries])
        self._one_word_name = np.array([" " not in e.norm for e in self.entries])
        # Census names (labels the model lacks, or narrower than its own) match exactly or not at
        # all: no embedding needed
        self._name_emb = np.zeros((len(self.entries), self.tower.dim), dtype=np.float32)
        self._name_emb[~self._exact_only] = self._embed([e.name for e in self.entries if not e.exact_only])
        # field -> each group's non-acronym names as word tuples: interchangeable inside a longer name
        groups: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for e in self.entries:
            if e.group and not e.acronym and e.field in SYNONYM_GROUP_FIELDS:
                groups.setdefault((e.field, e.label), []).append(tuple(e.norm.split()))
        self._group_names: dict[str, list[list[tuple[str, ...]]]] = {}
        for (f, _), names in groups.items():
            if len(set(names)) > 1:
                self._group_names.setdefault(f, []).append(list(dict.fromkeys(names)))

    @classmethod
    def from_manifest(cls, tower: TextTower, manifest, **kw) -> PromptResolver:
        """A resolver over the labels of the manifest's training conditions."""
        from ..data.conditions import train_conditions

        return cls(tower, vocab_from_conditions(train_conditions(manifest)),
                   ontology_ids=manifest.ontology_term_ids(), **kw)

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.tower.dim), dtype=np.float32)
        texts = [_ROMAN_TYPE.sub(lambda m: f"{m.group(1)} {_ROMAN[m.group(2).upper()]}", t) for t in texts]
        e = self._cache.encode(texts) if self._cache is not None else self.tower.embed(texts)
        return torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy()

    # ------------------------------------------------------------------ scoring
    def score_spans(self, spans: list[Span], fields=CONDITION_FIELDS,
                    exclude_norms: frozenset[str] = frozenset()) -> np.ndarray:
        """(len(spans), len(entries)) scores: 1 for an exact normalised match, else the cosine
        similarity (capped at 0.999); -inf for names of other fields, excluded names, acronyms
        the span does not spell in their case, and names of labels outside the model's
        vocabulary that the span does not match exactly."""
        if not spans:
            return np.zeros((0, len(self.entries)), dtype=np.float32)
        sims = np.minimum(self._embed([s.text for s in spans]) @ self._name_emb.T, 0.999)
        span_norms = [normalize_name(s.text) for s in spans]
        # two words the tower splits into pieces are alike by their spelling, not their meaning ("myocyte" and
        # "mastocyte", 0.7): such a word names a one-word name exactly, as an acronym's plural or misspelt only,
        # or by meaning when its first piece is that name ("bloodstream": blood ##stream)
        for i, n in enumerate(span_norms):
            if n.isalpha() and n not in self._words and n + "s" not in self._words:
                head = self.tower.tokenizer.tokenize(n)[0]
                sims[i, self._one_word_name & (self._norm_array != head)] = -np.inf
        for i, n in enumerate(span_norms):
            for j in self._norm_index.get(n, ()):
                sims[i, j] = 1.0
            if spans[i].text.endswith("s"):  # an acronym's plural ("AMs", "DCs") is that acronym
                for j in self._norm_index.get(normalize_name(spans[i].text[:-1]), ()):
                    if self._acronym[j]:
                        sims[i, j] = 1.0
            for f, variant in self._group_synonym_variants(n):
                for j in self._norm_index.get(variant, ()):
                    if self._field_of[j] == f:
                        sims[i, j] = 1.0
        # words that name no particular disease ("infection", "lesions": unspecific.yaml) name one only exactly
        for f, words in self._unspecific.items():
            cols = self._field_of == f
            for i, n in enumerate(span_norms):
                if all(w in words or w in self._generic for w in n.split()):
                    sims[i, cols] = np.where(sims[i, cols] >= 1.0, 1.0, -np.inf)
        # a tissue's name inside a compound that names something else ("blood vessels", "skin-homing") is no tissue
        compounds = [s for s, n in zip(spans, span_norms, strict=True) if n in self._not_sites]
        for i, s in enumerate(spans):
            if any(c.contains(s) for c in compounds):
                sims[i, self._field_of == "tissue_general"] = -np.inf
        # a Census name counts only when named exactly: it flags or narrows a prompt, it never guesses
        sims[:, self._exact_only] = np.where(sims[:, self._exact_only] >= 1.0, 1.0, -np.inf)
        for i, n in enumerate(span_norms):  # misspelt or clipped: also a shorthand or narrower name ("lupsu")
            if sims[i].max() < 1.0:
                for j in self._put_right(n):
                    sims[i, j] = max(sims[i, j], TYPO_SCORE)
        # gene symbols mean nothing to the text tower (it read "KRT5+ TP63+ cells" as regulatory T cells, 0.70,
        # "CD19+CD27+ cells" as stem cells, "Mono_CD16" as classical monocytes): a span of symbols and generic
        # words, or of symbols and one name ("Mono"), is read by the marker table, never by meaning
        if self.markers is not None:
            for i, s in enumerate(spans):
                tokens = self.markers.tokens(s.text)
                rest = [w for w in tokens if self.markers.symbol(w) is None and w.lower() not in MARKER_SIGNS]
                if len(rest) < len(tokens) and (all(w.lower().strip(".,") in self._generic for w in rest)
                                                or normalize_name(" ".join(rest)) in self._exact_field):
                    sims[i] = np.where(sims[i] >= 1.0, 1.0, -np.inf)
        # a gene negated in the span ("CD14- monocytes") is not the name that carries it ("CD14 monocyte")
        for i, s in enumerate(spans):
            if any(_NEGATED_GENE.fullmatch(w) for w in s.text.split()):
                sims[i] = -np.inf
        allowed = np.isin(self._field_of, list(fields))
        if exclude_norms:
            allowed &= ~np.isin(self._norm_array, list(exclude_norms))
        sims[:, ~allowed] = -np.inf
        for j in np.flatnonzero(self._acronym & allowed):
            for i, s in enumerate(spans):
                if not acronym_allowed(self.entries[j], s.text):
                    sims[i, j] = -np.inf
        return sims

    def _put_right(self, norm: str) -> list[int]:
        """The names a span says with one word misspelt or clipped ("helthy", "hepatocyets", "alveloar
        macrophages", "lung adeno", "fibros"): a word of four letters or more that the text tower does not know
        whole, at Damerau-Levenshtein distance 1 (2 from eight letters on) from a word of the names or beginning
        a longer one, such that the span with that word put right is a name of the model; all of one label per
        field."""
        words, found = norm.split(), []
        for k, w in enumerate(words):
            for c in self._word_fixes(w):
                found += self._norm_index.get(" ".join(words[:k] + [c] + words[k + 1:]), [])
        found = [j for j in found if self.entries[j].in_model]
        labels: dict[str, set[str]] = {}
        for j in found:
            labels.setdefault(self.entries[j].field, set()).add(self.entries[j].label)
        return [j for j in found if len(labels[self.entries[j].field]) == 1]

    def _word_fixes(self, word: str) -> list[str]:
        """The words of the names that ``word`` may be clipped or misspelt from (see :meth:`_put_right`)."""
        if word not in self._fixes:
            out = []
            if word.isalpha() and len(word) >= 4 and word not in self._words:
                limit = 1 if len(word) < 8 else 2
                out = [c for c in self._name_words if c != word and (
                    len(c) > len(word) and c.startswith(word)
                    or DamerauLevenshtein.distance(word, c, score_cutoff=limit) <= limit)]
            self._fixes[word] = out
        return self._fixes[word]

    def _group_synonym_variants(self, norm: str) -> list[tuple[str, str]]:
        """(field, ``norm`` with one group name inside it, not all of it, swapped for another
        name of that group)."""
        words, out = norm.split(), []
        for f, groups in self._group_names.items():
            for names in groups:
                for g in names:
                    k = len(g)
                    for a in range(len(words) - k + 1 if k < len(words) else 0):
                        if tuple(words[a:a + k]) == g:
                            out += [(f, " ".join(words[:a] + list(h) + words[a + k:])) for h in names if h != g]
        return out

    def _matches(self, spans: list[Span], scores: np.ndarray, fields) -> list[Match]:
        """Per span and field, the best leaf name and the best group name (two matches)."""
        out = []
        for f in fields:
            for kind in (False, True):
                cols = np.flatnonzero((self._field_of == f) & (self._is_group == kind))
                if not len(cols) or not len(spans):
                    continue
                sub = scores[:, cols]
                best = sub.argmax(1)
                for i, s in enumerate(spans):
                    v = float(sub[i, best[i]])
                    if np.isfinite(v):
                        out.append(Match(f, s, self.entries[cols[best[i]]], v))
        return out

    # ------------------------------------------------------------------ resolution
    def resolve(self, prompt: str, allow_empty: bool = False) -> ResolvedPrompt:
        """The fields ``prompt`` names (see the module docstring).

        Raises :class:`PromptError` for an empty prompt, one without words, and (unless
        ``allow_empty``) one that names no field at all."""
        if prompt is None or not str(prompt).strip():
            raise prompt_error(str(prompt or ""), "the prompt is empty")
        prompt = str(prompt)
        if not has_words(prompt):
            raise prompt_error(prompt, "the prompt has no words")
        spelled = self._spelled_out(prompt)
        turns = user_turns(spelled)  # a pasted chat: its last user turn is the prompt, the earlier ones its context
        if turns:
            spelled, earlier = turns[-1], [t for t in turns[:-1] if has_words(t)]
        known, other, free = split_structured(spelled)
        known = {f: v for f, v in known.items() if f in CONDITION_FIELDS}
        chosen: dict[str, Match] = {}
        unresolved: dict[str, str] = {}
        absent: dict[str, str] = {}
        lists: dict[str, list[Match]] = {}
        for f, value in known.items():
            if f == "disease" and normalize_name(value) in NO_DISEASE_VALUES:
                value = "normal"  # "disease: none" is a healthy donor's cell, not an open field
            value = expand_shared_heads(value, self._exact_field)
            spans = candidate_spans(value, self.max_words)
            scores = self.score_spans(spans, (f,))
            matches = self._matches(spans, scores, (f,))
            m = select_matches(matches, self.thresholds).get(f)
            if m is None:
                unresolved[f] = value
            elif not m.entry.in_model:
                unresolved[f], absent[f] = value, m.entry.label
            else:
                chosen[f] = self._refine(m, spans, scores, [])
                lists.update(listed_matches({f: chosen[f]}, matches, value))
        rest = [f for f in CONDITION_FIELDS if f not in known]
        text = "; ".join(free + [v for k, v in other.items() if k not in IGNORED_KEYS | ASSAY_KEYS]) \
            if known or other else spelled
        in_text = assays_named(text)  # assay names are not read as fields ("v2" means nothing to a text tower)
        text = expand_shared_heads(in_text.rest, self._exact_field)
        scope = read_scope(text, self._names_a_label) if rest and has_words(text) else PromptScope(text)
        if turns and earlier:
            scope = with_context(scope, earlier)
        # what is asked first, then the context; a cell type is never read from an aside ("we already have
        # plenty of ciliated cells"), a tissue or disease may be (module docstring of prompt_scope)
        # a field the asked parts leave open ("I just want Tregs, no particular organ") is read from them only
        later = [f for f in rest if f not in scope.held_open]
        parts = [(scope.asked, rest), (scope.context, later), (scope.asides, [f for f in later if f != "cell_type"])] \
            if scope.split else [(text, rest)]
        for part, fields in parts:
            todo = [f for f in fields if f not in chosen and f not in unresolved]
            if not todo or not has_words(part):
                continue
            spans = candidate_spans(part, self.max_words)
            scores = self.score_spans(spans, todo)
            matches = self._matches(spans, scores, todo)
            picked = select_matches(matches, self.thresholds)
            for f, m in picked.items():
                if not m.entry.in_model:
                    unresolved[f], absent[f] = m.span.text, m.entry.label
                    continue
                # a tissue's sub-site in or before the cell type's own words is part of its name and may refine it
                # ("airway cells with beating cilia", "type 2 alveolar pneumocytes"); one after them is where the
                # cells are ("T cells in the rectum" is no kind of T cell)
                others = [c.span for g, c in picked.items() if g != f and not (
                    f == "cell_type" and g == "tissue_general" and c.entry.narrower
                    and c.span.segment == m.span.segment and c.span.start < m.span.end)]
                chosen[f] = self._refine(m, spans, scores, others)
            lists.update(listed_matches({f: chosen[f] for f in picked if f in chosen}, matches, part))
        out = self._result(prompt, chosen, unresolved, absent, structured=bool(known), lists=lists)
        left_open = set(unresolved) | open_fields(text)
        if out.fields["tissue_general"] is None and not known and "tissue_general" not in left_open \
                and len(out.candidates["disease"]) == 1 and out.fields["disease"] in self._organ:
            # "AT2 cells, LUAD": in free text a disease whose name holds its organ names that organ
            organ = self._organ[out.fields["disease"]]
            out.fields["tissue_general"], out.candidates["tissue_general"] = organ, [(organ, 1.0)]
            out.confidence["tissue_general"] = out.confidence["disease"]
            out.spans["tissue_general"] = out.spans["disease"]
        if self.markers is not None and "cell_type" not in absent:
            # also where a "cell type:" value matched no name ("SCGB1A1+ secretory cell"); read from what is asked
            self._read_markers(out, "; ".join(p for p in (scope.asked, scope.context) if p) if scope.split
                               else expand_shared_heads(prompt, self._exact_field))
        self._exclude(out, scope.excluded, scope.kept)  # after the markers: "CD4+ cells, but not Tregs"
        out.shares = stated_shares(prompt, out, lists.get("cell_type", []))
        value = next((v for k, v in other.items() if k in ASSAY_KEYS), None)
        self._read_assay(out, in_text if value is None else assays_named(value), value)
        if not allow_empty and all(v is None for v in out.fields.values()) and not out.assays:
            why = self.unresolved_reason(out) if unresolved else \
                "it names no cell type, tissue or disease this model knows"
            terms = TERM_ID.findall(spelled)  # the ids no shipped ontology names
            if terms:
                why += f"; ontology term id {', '.join(map(repr, terms))} is no term of the shipped ontologies"
            raise prompt_error(prompt, why)
        return out

    def _spelled_out(self, prompt: str) -> str:
        """``prompt`` with URL escapes decoded ("CL%3A0000057" from a query string), a disease denied with its organ
        said as no disease ("no lung disease" -> "no disease (lung)"), a mixture's proportions left out ("70%
        classical and 30% non-classical monocytes", "hepatocytes with some cholangiocytes": a list), and each
        ontology term id that is none of the model's labels' ids written as its term's label ("CL:0000236" -> "B
        cell"), so that an id of a group, a narrower term or a term the model lacks is read as its name is."""
        if _URL_ESCAPE.search(prompt):
            prompt = urllib.parse.unquote(prompt)
        prompt = _NO_DISEASE_OF.sub(lambda m: f"{m.group(1)} {m.group(4)} ({m.group(3).strip()})", prompt)
        prompt = _SOME_MORE.sub("and ", _PROPORTION.sub(" ", prompt))
        def name(m: re.Match) -> str:
            term = m.group(0).split(":")[0].upper() + ":" + m.group(0).split(":")[1]
            return m.group(0) if normalize_name(term) in self._own_ids else (term_label(term) or m.group(0))
        return TERM_ID.sub(name, prompt)

    def _read_markers(self, r: ResolvedPrompt, text: str) -> None:
        """The cell type from the marker genes ``text`` names
        (:class:`~clopdit_dist.models.marker_table.MarkerTable`): for a prompt that names none in
        words, every type near the best as a candidate, equal weights, confidence ``min(1, score /
        (2 * MIN_SCORE)) / candidates``; for one that names a group or list ("FCGR3A+ CD14-
        monocytes"), those of its candidates the markers name; for one that names a type with subtypes of
        its own (``subtypes.yaml``), the subtype where the markers name it and not the type ("FOXP3+ CD4 T
        cells": regulatory T cells)."""
        named = [c for c, _ in r.candidates["cell_type"]]
        for name in self._listed_names(r.spans.get("cell_type") or ""):
            if normalize_name(name) in self._exact_field:  # "CD45+ cells" is the group: CD45 narrows nothing
                text = text.replace(name, " ")
        if len(named) == 1:
            # a gene the type's own names hold ("CD4" of "CD4-positive, alpha-beta T cell", whose comma the list split
            # above cuts, or of "CD4+ helper T cells") restates the type and sets none of its subtypes apart (read as
            # a marker, it gave regulatory T cells where they express CD4 the more)
            text = " ".join(w for w in self.markers.tokens(text)
                            if (self.markers.symbol(w) or ("",))[0] not in self._own_genes(named[0]))
            # a named type's own subtype, where the markers name it clearly apart; a type read by meaning only
            # ("cells lining the air sacs, SFTPC+"), where the markers name others and not it
            subtypes = [t for t in self._subtypes.get(named[0], ()) if t in self.vocab["cell_type"]]
            by_meaning = not put_right(r.confidence["cell_type"]) and self.markers.cell_types(text, named) is None
            pool = self.vocab["cell_type"] if by_meaning else named + subtypes if subtypes else None
            found = self.markers.cell_types(text, pool) if pool else None
            if found is not None and named[0] not in found[0]:
                r.fields["cell_type"], r.markers = found[0][0], found[2]
                r.candidates["cell_type"] = [(t, 1.0 / len(found[0])) for t in found[0]]
                r.confidence["cell_type"] = round(r.confidence["cell_type"] / len(found[0]), 4)
            return
        found = self.markers.cell_types(text, named, min_score=0.0) if named else \
            self.markers.cell_types(text, self.vocab["cell_type"])
        if found is None:
            return
        labels, score, said = found
        if named:
            self._narrow(r, "cell_type", labels)
            r.markers = said
            return
        r.fields["cell_type"], r.spans["cell_type"], r.markers = labels[0], said, said
        r.unresolved.pop("cell_type", None)
        r.candidates["cell_type"] = [(t, 1.0 / len(labels)) for t in labels]
        r.confidence["cell_type"] = round(min(1.0, score / (2 * MIN_SCORE)) / len(labels), 4)

    def _listed_names(self, spans: str) -> list[str]:
        """The names of a list's joined spans ("CD4 T cells, CD8 T cells"), a label with a comma of its own kept whole
        ("CD4-positive, alpha-beta T cell, CD8-positive, alpha-beta T cell": two names, not four)."""
        pieces, out, i = spans.split(", "), [], 0
        while i < len(pieces):
            pair = ", ".join(pieces[i:i + 2])
            whole = i + 1 < len(pieces) and normalize_name(pair) in self._exact_field
            out.append(pair if whole else pieces[i])
            i += 2 if whole else 1
        return [p for p in out if p]

    def _own_genes(self, label: str) -> frozenset[str]:
        """The genes the cell type's own names say it expresses ("CD4" of "CD4 T cell"; not its narrower names')."""
        if label not in self._own_genes_of:
            self._own_genes_of[label] = frozenset(
                sym[0] for e in self.entries if e.field == "cell_type" and e.label == label and e.in_model
                and not e.group and not e.narrower and not e.ontology_id and not e.from_ontology
                for w in self.markers.tokens(e.name) if (sym := self.markers.symbol(w)) and sym[1] > 0)
        return self._own_genes_of[label]

    def _read_assay(self, r: ResolvedPrompt, named: AssaysNamed, value: str | None) -> None:
        """The assays the prompt names (``named``: read from its "assay:" value where it has one,
        else from its free text), split into those the model has and those it lacks."""
        r.assays = [a for a in named.labels if a in self.assays]
        r.assay_absent = [] if r.assays else named.labels
        r.assay_text = ", ".join(named.spans) if named.spans else (value or "")

    def _names_a_label(self, word: str) -> bool:
        """Whether ``word`` ("non-classical") begins a label or a synonym of one (not a description:
        "non-ciliated secretory cell" of club cells does not make "non-ciliated" a name)."""
        norm = normalize_name(word)
        return any(n == norm or n.startswith(norm + " ") for n in self._names)

    def _exclude(self, r: ResolvedPrompt, excluded: list[str], kept: list[str] = ()) -> None:
        """Remove from each field's candidates the labels the prompt excludes ("dendritic cells, but
        not the plasmacytoid type"; :func:`~clopdit_dist.data.prompt_scope.read_scope`): each excluded
        text, split at list words, resolved like free text; its labels (a group's children) are taken
        out of a group or list the prompt asks for and listed in ``r.excluded``; where the prompt names no cell
        type ("non-immune cells of the liver", "lung cells, not macrophages"), every other type is a candidate
        (the generator keeps those of the conditions the other fields allow). The labels ``kept`` names ("Keep
        the plasma cells.") stay."""
        asked = [c for c, _ in r.candidates.get("cell_type", ())]
        stay = self._labels_named(kept, asked)
        for f, labels in self._labels_named(excluded, asked).items():
            labels = labels - stay.get(f, set())
            if f == "cell_type" and not r.candidates.get(f):  # "non-immune cells of the liver": every other type
                keep = [c for c in self.vocab[f] if c not in labels]
                if keep and len(keep) < len(self.vocab[f]):
                    r.excluded[f] = sorted(labels & set(self.vocab[f]))
                    r.fields[f], r.candidates[f] = keep[0], [(c, 1.0 / len(keep)) for c in keep]
                    r.confidence[f] = round(GROUP_DISCOUNT / len(keep), 4)
                    r.unresolved.pop(f, None)
                continue
            keep = [c for c, _ in r.candidates.get(f, ()) if c not in labels]
            if len(keep) < len(r.candidates.get(f, ())) and keep:
                r.excluded[f] = sorted(labels & {c for c, _ in r.candidates[f]})
                self._narrow(r, f, keep)

    def _labels_named(self, texts: list[str], asked: list[str]) -> dict[str, set[str]]:
        """Per field, the labels ``texts`` name (each split at list words and resolved like free text; a group as
        its children; a cell type also by its markers, among ``asked`` where the prompt asks for several)."""
        named: dict[str, set[str]] = {}
        for piece in (p for text in texts for p in _LIST_SPLIT.split(text)):
            if not has_words(piece):
                continue
            spans = candidate_spans(piece, self.max_words)
            matches = self._matches(spans, self.score_spans(spans), CONDITION_FIELDS)
            picked = select_matches(matches, self.thresholds)
            # a cell type by its markers: "but not the CD16+ ones", "neither CD8 nor Tregs"
            found = None if self.markers is None else self.markers.cell_types(piece, asked, min_score=0.0) \
                if len(asked) > 1 else self.markers.cell_types(piece, self.vocab["cell_type"])
            if found is not None and not (picked.get("cell_type") and picked["cell_type"].score >= 1.0):
                picked.pop("cell_type", None)
                named.setdefault("cell_type", set()).update(found[0])
            for f, m in picked.items():
                if m.entry.in_model:
                    named.setdefault(f, set()).update(m.entry.group or (m.entry.label,))
        if "cell_type" in named:  # "not macrophages" leaves out alveolar macrophages too
            named["cell_type"] |= {t for c in named["cell_type"] for t in self._subtypes.get(c, ())}
        return named

    def _narrow(self, r: ResolvedPrompt, f: str, labels: list[str]) -> None:
        """Field ``f`` of ``r`` restricted to ``labels`` (a subset of its candidates), equal weights."""
        old = {c for c, _ in r.candidates[f]}
        labels = [c for c in labels if c in old]
        r.candidates[f] = [(c, 1.0 / len(labels)) for c in labels]
        r.confidence[f] = round(r.confidence[f] * len(old) / len(labels), 4)
        if len(labels) == 1:
            r.fields[f], r.groups[f] = labels[0], None
        elif r.fields[f] not in labels:
            r.fields[f] = labels[0]

    def unresolved_reason(self, r: ResolvedPrompt) -> str:
        """Why the fields of ``r.unresolved`` cannot be given, with the model's labels for them."""
        parts = []
        for f, text in r.unresolved.items():
            label = r.absent.get(f)
            named = f"{text!r}" if label is None or normalize_name(label) == normalize_name(text) \
                else f"{text!r} ({label})"
            what = f"is a Census {FIELD_NAMES[f]} this model was not trained on" if label \
                else "matches no label of this model"
            labels = [repr(x) for x in self.vocab[f]]
            shown = ", ".join(labels[:12]) + (f" and {len(labels) - 12} more" if len(labels) > 12 else "")
            parts.append(f"{FIELD_NAMES[f]} {named} {what} (it knows {shown})")
        return "; ".join(parts)

    def resolve_many(self, prompts: list[str], allow_empty: bool = False) -> list[ResolvedPrompt]:
        return [self.resolve(p, allow_empty) for p in prompts]

    def _refine(self, m: Match, spans: list[Span], scores: np.ndarray, taken: list[Span]) -> Match:
        """A group match refined to a child where a strictly longer span around it, not a list,
        matches that child at or above the threshold and better than it matches the group."""
        if not m.entry.group:
            return m
        thr = self.thresholds[m.field]
        child_cols = [j for j, e in enumerate(self.entries)
                      if e.field == m.field and not e.group and e.label in m.entry.group]
        group_cols = [j for j, e in enumerate(self.entries) if e.field == m.field and e.label == m.entry.label]
        best = None
        for i, s in enumerate(spans):
            if not (s.contains(m.span) and s.length > m.span.length) or any(s.overlaps(t) for t in taken) \
                    or LIST_WORDS.search(s.text):  # "T cells and dendritic cells" is a list, not a kind of T cell
                continue
            j = child_cols[int(np.argmax(scores[i, child_cols]))]
            leaf, grp = float(scores[i, j]), float(scores[i, group_cols].max())
            if leaf >= thr and leaf > grp and (best is None or leaf > best.score):
                best = Match(m.field, s, self.entries[j], leaf)
        return best or m

    def _result(self, prompt: str, chosen: dict[str, Match], unresolved: dict[str, str], absent: dict[str, str],
                structured: bool, lists: dict[str, list[Match]]) -> ResolvedPrompt:
        fields, conf, spans, cands, groups, narrowed = {}, {}, {}, {}, {}, {}
        for f in CONDITION_FIELDS:
            m = chosen.get(f)
            if m is None:
                fields[f], conf[f], spans[f], cands[f], groups[f] = None, 0.0, None, [], None
                continue
            spans[f] = m.span.text
            if m.entry.narrower:
                narrowed[f] = m.span.text
            if f in lists:  # "lung and liver", "B cells and T cells": every label listed, equal weights
                spans[f] = ", ".join(x.span.text for x in lists[f])
                labels = list(dict.fromkeys(c for x in lists[f] for c in (x.entry.group or (x.entry.label,))))
                cands[f] = [(c, 1.0 / len(labels)) for c in labels]
                fields[f], conf[f], groups[f] = labels[0], round(m.score / len(labels), 4), None
                continue
            if not m.entry.group:
                fields[f], conf[f], cands[f], groups[f] = m.entry.label, round(m.score, 4), [(m.entry.label, 1.0)], None
                continue
            children = list(m.entry.group)
            w = 1.0 / len(children)
            fields[f] = self._nearest_child(m.span.text, m.field, children)
            conf[f] = round(GROUP_DISCOUNT * m.score * w, 4)
            cands[f] = [(c, w) for c in children]
            groups[f] = m.entry.label
        return ResolvedPrompt(fields, conf, spans, cands, groups, unresolved=unresolved, absent=absent,
                              narrowed=narrowed, structured=structured, prompt=prompt)

    def _nearest_child(self, text: str, f: str, children: list[str]) -> str:
        e = self._embed([text])[0]
        best, best_s = children[0], -np.inf
        for j, entry in enumerate(self.entries):
            if entry.field == f and not entry.group and not entry.exact_only and entry.label in children:
                s = float(self._name_emb[j] @ e)
                if s > best_s:
                    best, best_s = entry.label, s
        return best

    # ------------------------------------------------------------------ calibration
    def score_texts(self, texts: list[str], f: str) -> list[float]:
        """Each text's best score against the leaf names of field ``f``, the text taken whole
        as one span."""
        spans = [Span(0, 0, max(len(t.split()), 1), t) for t in texts]
        scores = self.score_spans(spans, (f,))[:, (self._field_of == f) & ~self._is_group & ~self._exact_only]
        return [float(v) for v in scores.max(1)] if len(spans) and scores.shape[1] else []

    def best_label(self, text: str, f: str, exclude_norms: frozenset[str] = frozenset()) -> tuple[str | None, float]:
        """The best leaf label of field ``f`` for ``text`` taken whole as one span, and its
        score (no threshold; group names ignored): what a threshold is compared with."""
        spans = [Span(0, 0, max(len(text.split()), 1), text)]
        scores = self.score_spans(spans, (f,), exclude_norms)
        cols = np.flatnonzero((self._field_of == f) & ~self._is_group & ~self._exact_only)
        if not spans or not len(cols):
            return None, -np.inf
        sub = scores[:, cols]
        i, j = np.unravel_index(int(np.argmax(sub)), sub.shape)
        v = float(sub[i, j])
        return (self.entries[cols[j]].label if np.isfinite(v) else None), v


def calibration_negatives(vocab: dict[str, list[str]], captions_per_field: int = 150,
                          seed: int = 0) -> dict[str, list[str]]:
    """Per field, TRAINING-side texts that do not name it: the other fields' training names,
    and every candidate span of training captions (:meth:`CaptionBuilder.augment`, no
    markers) of random vocabulary conditions with that field removed -- the words a real
    prompt has around its names."""
    from ..data.captions import CaptionBuilder

    rng = np.random.default_rng(seed)
    builder = CaptionBuilder({})
    tables = train_tables()
    labels = {f: vocab.get(f) or [""] for f in CONDITION_FIELDS}
    out = {}
    for f in CONDITION_FIELDS:
        texts = [n for g in CONDITION_FIELDS if g != f for lab in tables[FIELD_KIND[g]]
                 for n in train_names(FIELD_KIND[g], lab)]
        for _ in range(captions_per_field):
            meta = {g: labels[g][int(rng.integers(len(labels[g])))] for g in CONDITION_FIELDS if g != f}
            texts += [sp.text for sp in candidate_spans(builder.augment(meta, rng))]
        out[f] = list(dict.fromkeys(texts))
    return out


def calibrate_thresholds(tower: TextTower, vocab: dict[str, list[str]], return_scores: bool = False):
    """Per-field thresholds chosen on the TRAINING tables only (leave-one-synonym-out
    positives, other-field names and training context words as negatives; see the module
    docstring). Returns ``{field: threshold}`` (and the raw scores if ``return_scores``)."""
    r = PromptResolver(tower, vocab)
    negs = calibration_negatives(r.vocab)
    result, raw = {}, {}
    for f in CONDITION_FIELDS:
        pos = []
        for label in r.vocab[f]:
            for name in train_names(FIELD_KIND[f], label):
                got, s = r.best_label(name, f, exclude_norms=frozenset({normalize_name(name)}))
                if got is not None:
                    pos.append((s, got == label))
        neg = r.score_texts(negs[f], f)
        cuts = sorted({round(s, 4) for s, _ in pos} | {round(s, 4) for s in neg} | {0.0, 1.0})
        best, best_v = [], -1.0
        for c in cuts:
            right = sum(ok and s >= c for s, ok in pos) - sum((not ok) and s >= c for s, ok in pos)
            v = right / max(len(pos), 1) + sum(s < c for s in neg) / max(len(neg), 1)
            if v > best_v + 1e-9:
                best, best_v = [c], v
            elif abs(v - best_v) <= 1e-9:
                best.append(c)
        result[f] = round(_midpoint(cuts, best), 4)
        raw[f] = {"positives": pos, "negatives": neg, "objective": best_v, "best_cuts": (best[0], best[-1])}
    return (result, raw) if return_scores else result


def _midpoint(cuts: list[float], best: list[float]) -> float:
    """A cut c means "score >= c passes"; every c in (previous cut, best[0]] behaves as best[0],
    so the best interval is (cut below best[0], best[-1]]; its middle."""
    i = cuts.index(best[0])
    below = cuts[i - 1] if i > 0 else best[0]
    return (below + best[-1]) / 2


__all__ = ["PromptResolver", "PromptError", "ResolvedPrompt", "DEFAULT_THRESHOLDS", "GROUP_DISCOUNT",
           "calibrate_thresholds", "calibration_negatives"]
