"""Condition fields: what a generated cell is conditioned on, as data.

This module owns

* the condition fields (:data:`CONDITION_FIELDS`) and their human names (:data:`FIELD_NAMES`);
* the condition key and its stable ids (:func:`condition_key`, :func:`condition_ids`) and
  the training split's condition table (:func:`train_conditions`);
* the vocabulary of names of condition labels, loaded from package data files
  ``clopdit_dist/data/vocab/*.yaml`` (each states its sources): the TRAINING synonyms
  (:func:`train_names`), the HELD-OUT evaluation wordings (:func:`heldout_names`, tiers
  "reworded" and "rare"), the caption templates and style tables that
  :mod:`clopdit_dist.data.captions` assembles captions from, and the parent groups
  ("T cell", "monocyte", "cancer") of the prompt resolver, and Census labels a model may lack
  (``census_labels.yaml``), so a prompt naming one is refused by name, not guessed;
* prompt parsing: structured ``"key: value"`` prompts (:func:`parse_fields`) and the
  pure-python half of the free-text prompt resolver (normalisation, exact matching, spans,
  span selection); the half that embeds text is
  :class:`clopdit_dist.models.prompt_resolver.PromptResolver`.

Held-out wordings are evaluation data: training captions never contain them and the prompt
resolver never reads them (:func:`resolver_names` builds its table from :func:`train_names`,
``parents.yaml`` and ``census_labels.yaml`` only; ``tests/test_conditions.py`` checks the
tables are disjoint).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from ..errors import PromptError
from .ontology import narrower_terms, term_id, term_synonyms

CONDITION_FIELDS = ("cell_type", "tissue_general", "disease")
FIELD_NAMES = {"cell_type": "cell type", "tissue_general": "tissue", "disease": "disease"}
# condition field -> the "kind" of its name tables (the caption slot names)
FIELD_KIND = {"cell_type": "cell_type", "tissue_general": "tissue", "disease": "disease"}

EXAMPLE_PROMPT = "cell type: B cell; tissue: lung"


# ---------------------------------------------------------------------------------------
# Keys and ids
# ---------------------------------------------------------------------------------------

def condition_key(meta: dict) -> str:
    """The identity of a condition: ``cell_type|tissue_general|disease`` (missing -> "")."""
    return "|".join(str(meta.get(f, "")) for f in CONDITION_FIELDS)


def condition_ids(keys) -> np.ndarray:
    """int64 ids of condition keys, equal in every process (blake2b, not ``hash``)."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little", signed=True)
                     for k in keys], dtype=np.int64)


def train_conditions(manifest) -> list[dict]:
    """The (cell_type, tissue_general, disease) conditions of the training split, in the
    manifest's order (from its ``library_size`` groups)."""
    seen = {}
    for g in manifest.data["library_size"]["groups"]:
        meta = {f: g[f] for f in CONDITION_FIELDS}
        seen.setdefault(condition_key(meta), meta)
    return list(seen.values())


def vocab_from_conditions(conditions: list[dict]) -> dict[str, list[str]]:
    """Field -> its distinct labels (first-seen order), e.g. of :func:`train_conditions`:
    the vocabulary a :class:`~clopdit_dist.models.prompt_resolver.PromptResolver` resolves to."""
    return {f: list(dict.fromkeys(str(c[f]) for c in conditions if c.get(f) not in (None, ""))) for f in CONDITION_FIELDS}


# ---------------------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------------------

VOCAB_FILES = ("train_names", "heldout_reworded", "heldout_rare", "templates", "caption_style", "parents",
               "census_labels", "narrower", "descriptions", "shorthand", "unspecific", "subtypes",
               "protein_aliases", "ontology_dropped", "not_sites")


@functools.cache
def vocab_file(name: str) -> dict:
    """The parsed ``clopdit_dist/data/vocab/{name}.yaml`` (loaded once; do not mutate)."""
    import yaml

    if name not in VOCAB_FILES:
        raise ValueError(f"vocab file {name!r}: choose one of {VOCAB_FILES}")
    text = resources.files("clopdit_dist.data").joinpath(f"vocab/{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def _tuples(table: dict) -> dict[str, tuple[str, ...]]:
    return {str(k): tuple(str(x) for x in v) for k, v in (table or {}).items()}


@functools.cache
def train_tables() -> dict[str, dict[str, tuple[str, ...]]]:
    """kind ("cell_type", "tissue", "disease", "organism") -> label -> TRAINING synonyms."""
    return {kind: _tuples(t) for kind, t in vocab_file("train_names").items()}


@functools.cache
def heldout_tables(tier: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """kind -> label -> HELD-OUT names of ``tier`` ("reworded" or "rare"); the rare tier has
    no organism names of its own and reuses the reworded ones."""
    if tier not in ("reworded", "rare"):
        raise ValueError(f"tier={tier!r}: choose one of ('reworded', 'rare')")
    out = {kind: _tuples(t) for kind, t in vocab_file(f"heldout_{tier}").items()}
    if tier == "rare":
        out.setdefault("organism", heldout_tables("reworded")["organism"])
    return out


def generic_rewrites(label: str) -> list[str]:
    """Rewrites that apply to any label: ", alpha-beta" dropped, "-positive" -> "+"."""
    out = []
    for s in (label.replace(", alpha-beta", ""), label.replace("-positive", "+"),
              label.replace(", alpha-beta", "").replace("-positive", "+")):
        if s != label and s not in out:
            out.append(s)
    return out


def train_names(kind: str, label: str) -> list[str]:
    """Every wording of ``label`` training may use: the label, the TRAIN synonyms, the
    generic rewrites. ``kind`` is one of "cell_type", "tissue", "disease", "organism"."""
    table = train_tables()[kind]
    names = [label, *table.get(label, ()), *generic_rewrites(label)]
    return list(dict.fromkeys(names))


def heldout_names(kind: str, label: str, tier: str = "reworded") -> list[str]:
    """Held-out wordings of ``label`` in ``tier`` ("reworded" or "rare"); an unknown label
    has none but itself (its held-out caption then differs from training by its template
    only)."""
    if tier not in ("reworded", "rare"):
        raise ValueError(f"tier={tier!r}: choose one of ('reworded', 'rare')")
    return list(heldout_tables(tier)[kind].get(label, (label,)))


# ---------------------------------------------------------------------------------------
# Structured prompts
# ---------------------------------------------------------------------------------------

# a field key where a value follows ("cell type:", "tissue_general =", "disease=='...'",
# "cell_type_ontology_term_id: CL:..."), also quoted (JSON) and anywhere in a part, so
# "Cell type: B cell. Tissue: lung." and Census value filters
# ("cell_type == 'B cell' and tissue_general == 'lung'") read as pairs
_FIELD_KEY = re.compile(r"""(?:^|(?<=[\s,.{(\[=&?]))["']?(cell[ _]?type|tissue(?:[ _]general)?|disease)"""
                        r"""(?:_ontology_term_id)?"""
                        r"""["']?\s*(?:==|=|:)""", re.IGNORECASE)
_FIELD_OF_KEY = {v: k for k, v in FIELD_NAMES.items()} | {f.replace("_", " "): f for f in CONDITION_FIELDS} | {
    "celltype": "cell_type"}
# ", key:" / "| key =" / "&key=" inside a field's value: another pair's key of one to three words (not a term id's
# "CL:"); after " and " a one-word key with "=" ("cell_type=alveolar macrophage and condition=COVID-19")
_NEXT_KEY = re.compile(r"""[,|]\s*["']?(?:[A-Za-z][\w-]*\s+){0,2}[A-Za-z][\w-]*["']?\s*[:=](?!\d)"""
                       r"""|&[A-Za-z][\w-]*=|\s(?=and\s+["']?[A-Za-z][\w-]*["']?\s*==?(?!\d))""")
# a value in quotes and what follows its closing quote (a quote followed by a letter is an apostrophe: "Crohn's")
_QUOTED_VALUE = re.compile(r"""\s*(?P<q>["'“‘])(?P<value>.*?)["'”’](?!\w)(?P<rest>.*)""", re.DOTALL)
TERM_ID = re.compile(r"\b[A-Za-z]+:\d+\b")  # "CL:0000236 from UBERON:0002048": ids, no "CL" pair
_VALUE_EDGES = " \t\"'{},.&"  # and a closing bracket the value does not open (_strip_value)


def _strip_value(value: str) -> str:
    """A field value without the quotes, separators and closing brackets of its syntax around it
    (``"B cell"},``, ``'lung' and``), keeping a name's own brackets ("T cell (CD8+, alpha/beta)")."""
    while True:
        v = re.sub(r"(?i)\s+and$", "", value.strip(_VALUE_EDGES).rstrip("(["))  # a value filter's "and ("
        for open_, close in ("()", "[]"):
            if v.endswith(close) and v.count(close) > v.count(open_):
                v = v[:-1]
        if v == value:
            return v
        value = v


def _pair_colon(text: str) -> int:
    """The offset of the first ":" of ``text`` outside an ontology term id ("UBERON:0002048"), or -1."""
    ids = [m.span() for m in TERM_ID.finditer(text)]
    return next((i for i, c in enumerate(text) if c == ":" and not any(a < i < b for a, b in ids)), -1)


def parse_fields(prompt: str) -> dict[str, str]:
    """"cell type: B cell; tissue: lung" → {"cell_type": "B cell", "tissue_general": "lung"}.

    Keys are the human field names and the field names themselves; other pairs (and text
    without a colon) are ignored here (:func:`split_structured` returns them)."""
    return split_structured(prompt)[0]


def split_structured(prompt: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """A prompt's parts: ``(fields, other_pairs, free_text)``.

    ``fields``: recognised field pairs, ``key: value`` (also ``key=value``, ``key == 'value'``,
    JSON's ``"key": "value"``), keys as in :func:`parse_fields`, a value running to the next field
    key or the end of its part; ``other_pairs``: ``key: value`` pairs with any other key
    (lower-cased key of at most three words -> value), e.g. "organism: human" or "location: lung";
    ``free_text``: the rest, with those keys ("COVID-19 ICU cohort: classical monocytes") and what follows
    another pair's key inside a field's value ("tissue: colon, diagnosis: CD"). Parts are separated by ";" or
    newlines."""
    fields, other, free = {}, {}, []
    for part in prompt.replace("\n", ";").split(";"):
        keys = list(_FIELD_KEY.finditer(part))
        head = part[:keys[0].start()] if keys else part
        for k, m in enumerate(keys):
            value = part[m.end():keys[k + 1].start() if k + 1 < len(keys) else len(part)]
            # a value ends where another key's pair begins ("tissue: sigmoid colon, diagnosis: CD, ..."): the
            # pairs after it are read as free text
            cut = _NEXT_KEY.search(value)
            if cut:
                free.append(value[cut.start() + 1:].strip())
                value = value[:cut.start()]
            # a quoted value ends at its closing quote: 'cell type = "basal cell", healthy donors only'
            quoted = _QUOTED_VALUE.match(value)
            if quoted and has_words(re.sub(r"(?i)\b(?:and|or)\b", " ", quoted.group("rest"))):
                free.append(quoted.group("rest").strip(_VALUE_EDGES))
                value = quoted.group("value")
            value = _strip_value(value)
            if value:
                fields[_FIELD_OF_KEY[m.group(1).lower().replace("_", " ")]] = value
        # a key is a few words ("location", "marker genes"); before a longer one the colon ends a sentence
        # ("... I want to model the epidermis itself: the main epidermal cells"), which is free text
        colon = _pair_colon(head)
        if colon >= 0 and head[colon + 1:].strip() and len(head[:colon].split()) <= 3:
            key, value = head[:colon], head[colon + 1:]
            other[key.strip().lower()] = value.strip()
            free.append(key.strip())  # a key may say something itself: "COVID-19 ICU cohort: classical monocytes"
        elif head.strip(_VALUE_EDGES + "()[]"):
            free.append(head.strip())
    return fields, other, free


# ---------------------------------------------------------------------------------------
# The pure-python half of prompt resolution
# ---------------------------------------------------------------------------------------

def _strip_accents(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _singular(w: str) -> str:
    if len(w) > 3 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "is", "us")):
        return w[:-1]
    return w


def normalize_name(text: str) -> str:
    """The form exact matching compares: case, accents, plurals, hyphens, underscores and punctuation
    folded, "positive" written "+" ("CD8-positive T cells" == "cd8+ t cell")."""
    s = _strip_accents(text).lower()
    s = re.sub(r"[-\s]?positive\b", "+", s)
    s = s.replace("-", " ").replace("_", " ")
    s = re.sub(r"[^\w+ ]", " ", s)
    return " ".join(_singular(w) for w in s.split())


def is_acronym(name: str) -> bool:
    """Short upper-case abbreviations ("AM", "EC", "NK", "DC") match case-sensitively only,
    so that "I am" is not an alveolar macrophage (MiniLM is uncased: its cosine of "am" and
    "AM" is 1)."""
    return len(name) <= 2 and name.isupper()


@dataclass(frozen=True)
class NameEntry:
    """One name of the resolver's table: a label's (or a parent group's) wording."""

    field: str
    label: str  # the vocabulary label, or the group's label for a parent name
    name: str
    norm: str
    group: tuple[str, ...] = ()  # a parent name: its children in the vocabulary; () for a leaf name
    acronym: bool = False
    in_model: bool = True  # False: a Census label the vocabulary lacks (census_labels.yaml)
    narrower: bool = False  # a name more specific than ``label``, answered with it (narrower.yaml)
    ontology_id: bool = False  # ``name`` is the label's ontology term id ("CL:0000236")
    shorthand: bool = False  # lab shorthand or a health wording (shorthand.yaml)
    from_ontology: bool = False  # the label's term's synonym, or (narrower) a term below it (data/ontology.py)

    @property
    def exact_only(self) -> bool:
        """Census names (lacking or narrower), term ids, shorthand and ontology names count only when a span is one
        exactly: by similarity "uninfected" was "virus-infected" and "healthy donor" "infected donors"."""
        return not self.in_model or self.narrower or self.ontology_id or self.shorthand or self.from_ontology


def resolver_names(vocab: dict[str, list[str]], ontology_ids: dict[str, dict[str, str]] | None = None
                   ) -> list[NameEntry]:
    """The names the prompt resolver matches spans against: per field, each vocabulary label,
    its TRAINING synonyms and generic rewrites (:func:`train_names`), and the names of the
    ``parents.yaml`` groups that have children in the vocabulary; then (``narrower=True``) the
    ``narrower.yaml`` names of labels in the vocabulary, the ``descriptions.yaml`` phrases of labels
    in the vocabulary (what a cell does or where it sits, as leaf names of the label) and
    (``shorthand=True``, exact only) the ``shorthand.yaml`` names of sample, donor and cell shorthand
    ("BAL", "PB", "ctrl", "VSMC"), and
    (``in_model=False``) the names of ``census_labels.yaml`` labels outside it, each where its
    normalised form is none of the former's; and, where ``ontology_ids`` gives the vocabulary labels'
    ontology term ids (``Manifest.ontology_term_ids``), the ids themselves (``ontology_id=True``), the
    terms' ontology synonyms and, after the Census names (which refuse what a model lacks: "microglia" is
    below macrophage), the names of the terms below them (``from_ontology=True``, exact only,
    :func:`_ontology_names`). Never a held-out name."""
    out = _model_names(vocab)
    own = {(e.field, e.norm) for e in out}
    present = {f: {str(x) for x in vocab.get(f, ())} for f in CONDITION_FIELDS}
    for f, table in (ontology_ids or {}).items():
        out += [NameEntry(f, label, term, normalize_name(term), ontology_id=True)
                for label, term in sorted(table.items()) if f in present and label in present[f] and ":" in term]
    for f in CONDITION_FIELDS:
        for label, names in (vocab_file("narrower").get(FIELD_KIND[f]) or {}).items():
            for name in dict.fromkeys([n for name in names for n in (name, *generic_rewrites(name))]):
                if label in present[f] and (f, normalize_name(name)) not in own:
                    out.append(NameEntry(f, label, name, normalize_name(name), (), is_acronym(name), narrower=True))
    taken = {(e.field, e.norm) for e in out}
    for f in CONDITION_FIELDS:  # leaf names of their label: descriptions by meaning, shorthand exactly
        for file in ("descriptions", "shorthand"):
            for label, names in (vocab_file(file).get(FIELD_KIND[f]) or {}).items():
                out += [NameEntry(f, label, name, normalize_name(name), (), is_acronym(name),
                                  shorthand=file == "shorthand") for name in names
                        if label in present[f] and (f, normalize_name(name)) not in taken]
    in_vocab = {f: {label: term for label, term in terms.items() if label in present.get(f, ())}
                for f, terms in (ontology_ids or {}).items() if f in present}
    out += _ontology_names(out, {f: {label: term_synonyms(term) for label, term in terms.items()}
                                 for f, terms in in_vocab.items()})
    taken = {e.norm for e in out}
    for f in CONDITION_FIELDS:
        # a label this model lacks: a Census label, or one of the project's own (train_names.yaml) that this atlas
        # did not train on (a rare type of a small atlas: "hematopoietic stem cells" at 8,000 cells), refused by name
        lacking = {**{label: train_names(FIELD_KIND[f], label) for label in train_tables()[FIELD_KIND[f]]},
                   **(vocab_file("census_labels").get(FIELD_KIND[f]) or {})}
        for label, names in lacking.items():
            if label in present[f]:
                continue
            for name in dict.fromkeys([label, *(names or ()), *generic_rewrites(label)]):
                if normalize_name(name) not in taken:
                    out.append(NameEntry(f, label, name, normalize_name(name), (), is_acronym(name), False))
    if not in_vocab:
        return out
    # a Census label the model lacks refuses its ontology synonyms too ("Ito cells" are hepatic stellate cells, which
    # lie below fibroblast), and a term below it goes to no label of the model: each term below goes to the nearest
    # label, present or lacking, and only the present labels' terms are named (the lacking labels' would be
    # thousands: every part of the brain)
    lacking = {f: {label: term for label in dict.fromkeys(e.label for e in out if e.field == f and not e.in_model)
                   if (term := term_id(label, f))} for f in in_vocab}
    out += _ontology_names(out, {f: {label: term_synonyms(term) for label, term in terms.items()}
                                 for f, terms in lacking.items()}, in_model=False)
    below = {f: narrower_terms({**lacking[f], **terms}) for f, terms in in_vocab.items()}
    out += _ontology_names(out, {f: {label: names for label, names in b.items() if label in present[f]}
                                 for f, b in below.items()}, narrower=True)
    return out


def _ontology_names(table: list[NameEntry], names: dict[str, dict[str, tuple[str, ...] | list[str]]],
                   narrower: bool = False, in_model: bool = True) -> list[NameEntry]:
    """Entries for ontology ``names`` (field -> label -> names) that name their label and nothing else. The
    shipped ontologies give exact and related synonyms alike, untyped, so a name is left out where it is

    * an abbreviation (no lower-case letter: "DC2", "IPC", "ARC"; or a short word: "bac"), which other fields of
      study, or plain English, use for other things; or a curator's note ("(Mmus)", "NN_1");
    * already a name of ``table`` (of this label or another), or a name of two labels;
    * a held-out name of the evaluation's prompt tiers (they measure wordings the resolver was never given);
    * a wording holding another label's name, or a group's that lacks the label ("plasmacytoid T cell",
      "T-associated plasma cell" for the plasmacytoid dendritic cell; "lymph node of lung" below lymph node).
    """
    left_out = {e.norm for e in table} | _heldout_and_dropped_norms()
    found: dict[tuple[str, str], dict[str, str]] = {}  # (field, norm) -> label -> name
    for f, table_f in names.items():
        for label, label_names in sorted(table_f.items()):
            for name in label_names:
                norm = normalize_name(name)
                if _usable_ontology_name(name) and norm not in left_out:
                    found.setdefault((f, norm), {}).setdefault(label, name)
    inside: dict[tuple[str, str], list[NameEntry]] = {}  # (field, norm) -> the model's names
    for e in table:
        if e.in_model and not e.ontology_id:
            inside.setdefault((e.field, e.norm), []).append(e)
    out = []
    for (f, norm), by_label in sorted(found.items()):
        if len(by_label) > 1:
            continue
        (label, name), = by_label.items()
        words = norm.split()
        parts = (" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1))
        if not any(e.label != label and label not in e.group for part in parts for e in inside.get((f, part), ())):
            out.append(NameEntry(f, label, name, norm, in_model=in_model, narrower=narrower, from_ontology=True))
    return out


@functools.cache
def _heldout_and_dropped_norms() -> frozenset[str]:
    """The normalised held-out names of the evaluation's tiers and the names of ``ontology_dropped.yaml``."""
    held = {h for tier in ("reworded", "rare") for t in heldout_tables(tier).values() for hs in t.values() for h in hs}
    dropped = {n for t in vocab_file("ontology_dropped").values() for ns in t.values() for n in ns}
    return frozenset(normalize_name(n) for n in held | dropped)


def _usable_ontology_name(name: str) -> bool:
    return (any(c.islower() for c in name) and not set(name) & set("()[]_")
            and not (name.isalpha() and name.islower() and len(name) <= 3))


def _model_names(vocab: dict[str, list[str]]) -> list[NameEntry]:
    out: list[NameEntry] = []
    for f in CONDITION_FIELDS:
        labels = [str(x) for x in vocab.get(f, ())]
        present = set(labels)
        parents = vocab_file("parents").get(f) or {}
        # a parent group's name with two or more children here names the group, even where a training caption
        # used it for one child ("inflammatory bowel disease" for ulcerative colitis)
        grouped = {normalize_name(n) for g, spec in parents.items()
                   if g not in present and len(set(spec["children"]) & present) > 1 for n in spec["names"]}
        seen = set()
        for label in labels:
            for name in train_names(FIELD_KIND[f], label):
                norm = normalize_name(name)
                if (norm in grouped and norm != normalize_name(label)) or (label, name) in seen:
                    continue
                seen.add((label, name))
                out.append(NameEntry(f, label, name, norm, (), is_acronym(name)))
        for group, spec in parents.items():
            children = tuple(c for c in spec["children"] if c in present)
            if not children or group in present:  # a group that is itself a label resolves as the label
                continue
            for name in spec["names"]:
                out.append(NameEntry(f, group, name, normalize_name(name), children, is_acronym(name)))
    return out


# a misspelt or clipped name ("helthy", "lung adeno"): above every field's threshold, below an exact name, so a
# name spelt right wins
TYPO_SCORE = 0.97


def put_right(score: float) -> bool:
    """Whether a match's score is an exact name's or a name put right (:data:`TYPO_SCORE`), not a similarity
    (which may be as high with a small text tower)."""
    return score >= 1.0 or abs(score - TYPO_SCORE) < 1e-6

# "=" and "_" join the words of metadata strings ("condition=healthy_control; compartment=LN")
_WORD = re.compile(r"[^\s,;:|()\[\]{}\"=_]+")
# (relative pronouns and demonstratives since session 27: "cells that" was a B cell by similarity, 0.715; determiners,
# quantifiers and adverbs since session 31: "Simulate 50 such cells", "other cells", "several more cells", "cells
# again" were B or ciliated cells. No vocabulary name begins or ends with one of them.)
EDGE_STOPWORDS = frozenset("a an the of from in into with and or for to on at by as is are my me some any "
                           "please generate simulate show give want i that which who whose those these this "
                           "they them their its "
                           "such same other another several more many few each every all both similar like "
                           "again also too just only very much most one".split())


@dataclass(frozen=True)
class Span:
    """Words ``start:end`` of segment ``segment``; ``text`` is the prompt's own substring."""

    segment: int
    start: int
    end: int
    text: str

    def overlaps(self, other: "Span") -> bool:
        return self.segment == other.segment and self.start < other.end and other.start < self.end

    def contains(self, other: "Span") -> bool:
        return self.segment == other.segment and self.start <= other.start and other.end <= self.end

    @property
    def length(self) -> int:
        return self.end - self.start


def prompt_words(text: str) -> list[list[tuple[str, int, int]]]:
    """Per segment (split at ; | newlines and sentence ends), its words as (word, start, end)
    character offsets into ``text``."""
    out = []
    for m in re.finditer(r"[^;|\n!?]+", text):
        words = []
        for w in _WORD.finditer(m.group()):
            word = w.group().rstrip(".")
            if word and re.search(r"\w", word):
                words.append((word, m.start() + w.start(), m.start() + w.start() + len(word)))
        if words:
            out.append(words)
    return out


@functools.cache
def generic_words() -> frozenset[str]:
    """Words that name no condition on their own: the function words above, and every word of
    the TRAINING context prefixes/suffixes, field keys and template text (caption_style.yaml,
    templates.yaml "train"), plus "cell(s)". A span made of these only is never a candidate
    (MiniLM puts "cells" near "enterocyte" and "tissue" near "lung")."""
    style = vocab_file("caption_style")
    texts = list(style["context_prefixes"]) + list(style["context_suffixes"])
    texts += [k for keys in style["field_keys"].values() for k in keys]
    texts += [p for t in vocab_file("templates")["train"] for part in t for p in part[1:]]
    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t))}
    return frozenset(words | EDGE_STOPWORDS | {"cell", "cells"})


def candidate_spans(text: str, max_words: int = 6) -> list[Span]:
    """Every n-gram of 1..``max_words`` words within a segment, except those that begin or end
    with a function word ("of", "from", the, ...; a name never does) and those made of
    :func:`generic_words` only."""
    spans = []
    generic = generic_words()
    for si, words in enumerate(prompt_words(text)):
        lower = [w[0].lower() for w in words]
        for i in range(len(words)):
            for j in range(i + 1, min(len(words), i + max_words) + 1):
                if lower[i] in EDGE_STOPWORDS or lower[j - 1] in EDGE_STOPWORDS:
                    continue
                if all(w in generic for w in lower[i:j]):
                    continue
                spans.append(Span(si, i, j, text[words[i][1]:words[j - 1][2]]))
    return spans


# not a comma: labels hold one ("CD4-positive, alpha-beta T cell")
_SHARED_HEAD = re.compile(r"(?<![\w+-])((?:type\s+)?[\w+-]+)(\s*(?:/|&|\band\b|\bor\b|\bvs\b\.?|\bversus\b)\s*)"
                          r"((?:type\s+)?[\w+-]+)((?:\s+[\w-]+){1,3})", re.IGNORECASE)


def expand_shared_heads(text: str, names: dict[str, str]) -> str:
    """"CD4 and CD8 T cells" -> "CD4 T cells and CD8 T cells": two words (or "type" and a word: "type I and
    type II pneumocytes") joined by "and", "or", "/" or "&" before the words they share, where each word with
    those words is an exact name (``names``: normalised name -> field) of one field; the longest shared words
    that make both names. Other text is left as it is."""
    def swap(m: re.Match) -> str:
        a, gap, b, tail = m.groups()
        words = tail.split()
        for k in range(len(words), 0, -1):
            head = " ".join(words[:k])
            fa, fb = names.get(normalize_name(f"{a} {head}")), names.get(normalize_name(f"{b} {head}"))
            whole = normalize_name(f"{a}{gap}{b} {head}") in names  # a name with "and" in it stays whole
            if fa is not None and fa == fb and normalize_name(a) != normalize_name(b) and not whole:
                rest = tail[tail.index(words[k - 1]) + len(words[k - 1]):]
                return f"{a} {head}{gap}{b} {head}{rest}"
        return m.group()
    return _SHARED_HEAD.sub(swap, text)


def organisms_named(text: str) -> set[str]:
    """The organisms ("Homo sapiens", "Mus musculus") that ``text`` names by one of their names
    in train_names.yaml or census_labels.yaml, word for word: {"Mus musculus"} for "mouse lung
    macrophages" or "murine monocytes"."""
    extra = vocab_file("census_labels").get("organism") or {}
    names = {normalize_name(n): label for label in train_tables()["organism"]
             for n in [*train_names("organism", label), *(extra.get(label) or ())]}
    found = set()
    for words in prompt_words(text):
        w = [x[0] for x in words]
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + 2) + 1):
                label = names.get(normalize_name(" ".join(w[i:j])))
                if label:
                    found.add(label)
    return found


def has_words(text: str) -> bool:
    return bool(re.search(r"\w", text or ""))


def acronym_allowed(entry: NameEntry, span_text: str) -> bool:
    """An acronym name takes part only when the span is that acronym in its own case (plural
    "s" allowed)."""
    return not entry.acronym or span_text in (entry.name, entry.name + "s")


@dataclass
class Match:
    """The best label of one field for one span."""

    field: str
    span: Span
    entry: NameEntry
    score: float


def select_matches(matches: list[Match], thresholds: dict[str, float]) -> dict[str, Match]:
    """Per field, the best-scoring span at or above the field's threshold, no two fields on
    overlapping spans — greedily by score (ties: a span that does not lie inside a longer span
    another field matches, then the longer span, then a leaf name over a group name); a group is
    then replaced by one of its children that the prompt names as well, at no lower score. One
    exception: a tissue span may lie inside a strictly longer disease or cell-type span that is
    an exact name ("lung cancer" names lung and lung adenocarcinoma, "liver sinusoidal endothelial
    cells" liver and endothelial cells), since such names carry their organ; a merely similar one
    ("human lung" ~ "lung cancer") may not.

    A span that exactly names one field is not read as another field by similarity: in "T cells
    from lung and liver", "liver" is a second tissue, not non-alcoholic fatty liver disease
    (cosine 0.62). And where a field is named exactly twice, the mention inside another field's
    longer span yields: "cells lining the blood vessels of the liver" is liver, "blood" being part
    of a cell-type description."""
    exact_fields: dict[Span, set[str]] = {}
    for m in matches:
        if m.score >= 1.0:
            exact_fields.setdefault(m.span, set()).add(m.field)
    passing = [m for m in matches if m.score >= thresholds[m.field]
               and (m.score >= 1.0 or not exact_fields.get(m.span, set()) - {m.field})]

    def inside_other(m: Match, exact: bool) -> bool:
        return any(o.field != m.field and o.span.contains(m.span) and o.span.length > m.span.length
                   and (put_right(o.score) or not exact) for o in passing)

    # a name put right ("alveloar macrophages", TYPO_SCORE) ranks as a name spelt right, so the longer one wins; of
    # two names, one inside another field's name yields first ("white blood cells in the gut": the gut), then one
    # inside a span read by meaning ("cells lining the blood vessels of the liver": the liver)
    order = sorted(passing, key=lambda m: (-1.0 if put_right(m.score) else -m.score, inside_other(m, True),
                                           inside_other(m, False), -m.span.length, -m.score, bool(m.entry.group),
                                           m.span.segment, m.span.start))
    chosen: dict[str, Match] = {}
    for m in order:
        if m.field in chosen:
            continue
        if any(m.span.overlaps(c.span) and not _nested_ok(m, c) for c in chosen.values()):
            continue
        chosen[m.field] = m
    for f, g in list(chosen.items()):  # "ciliated airway epithelial cells": the child named, not the group
        others = [c.span for h, c in chosen.items() if h != f]
        child = next((m for m in order if m.field == f and not m.entry.group and m.entry.label in g.entry.group
                      and m.score >= g.score and not any(m.span.overlaps(o) for o in others)), None)
        if g.entry.group and child is not None:
            chosen[f] = child
    return chosen


# what may stand between the names of a list: "lung and liver", "lung, liver or blood", "lung/liver", "naive vs
# memory B cells" (a comparison asks for both sides), quoted items of code ('["classical monocyte", "non-classical
# monocyte"]'); not a space alone ("NK lymphocyte" is one name, not NK cells and lymphocytes)
_LIST_GAP = re.compile(r"\s*[\"']?\s*(?:[,/&]\s*)?(?:(?:and|or|plus|vs\.?|versus|as well as|together with|along with)"
                       r"(?:\s+the)?\s*)?[\"']?\s*", re.IGNORECASE)
_LIST_SEPARATOR = re.compile(r"[,/&]|\b(?:and|or|plus|with|vs|versus)\b", re.IGNORECASE)
# the words that join two names into a list: a span holding one names two things, never one narrower thing
LIST_WORDS = re.compile(r"&|\b(?:and|or|plus|vs|versus)\b", re.IGNORECASE)


def listed_matches(chosen: dict[str, Match], matches: list[Match], text: str) -> dict[str, list[Match]]:
    """Per chosen field, every name of it the prompt lists beside the chosen one ("T cells from
    lung and liver", "lung, liver or blood", "B cells and T cells"), in prompt order: exact names
    (labels or parent groups) of that field, on spans no other chosen field holds, each next to a
    listed one with only commas, "and (the)", "or", "/" between. Only exact names: a list does not
    make a merely similar phrase a name."""
    words = prompt_words(text)
    taken = [c.span for c in chosen.values()]

    def next_to(a: Span, b: Span) -> bool:
        if a.segment != b.segment or a.overlaps(b):
            return False
        first, second = (a, b) if a.start < b.start else (b, a)
        seg = words[first.segment]
        gap = text[seg[first.end - 1][2]:seg[second.start][1]]
        return bool(_LIST_GAP.fullmatch(gap) and _LIST_SEPARATOR.search(gap))

    out = {}
    for f, c in chosen.items():
        if c.score < 1.0 or not c.entry.in_model:
            continue
        pool = sorted((m for m in matches if m.field == f and m.score >= 1.0 and m.entry.in_model
                       and not any(m.span.overlaps(t) for t in taken)), key=lambda m: (-m.span.length, m.span.start))
        listed = [c]
        grew = True
        while grew:
            grew = False
            for m in pool:
                if all(m.entry.label != x.entry.label and not m.span.overlaps(x.span) for x in listed) \
                        and any(next_to(m.span, x.span) for x in listed):
                    listed.append(m)
                    grew = True
        if len(listed) > 1:
            out[f] = sorted(listed, key=lambda m: (m.span.segment, m.span.start))
    return out


def _nested_ok(a: Match, b: Match) -> bool:
    """A tissue span inside a strictly longer span that exactly names a disease, or a cell type
    when the tissue is named exactly too ("lung cancer", "liver sinusoidal endothelial cell"):
    names that carry their organ; not "lymphocyte" (near "lymph node") inside "B lymphocyte". A
    sub-site of a tissue (``narrower.yaml``) named exactly may lie inside any longer cell-type span, and a
    span that is exactly both a tissue's and a disease's name ("psoriatic plaque") is both."""
    pair = {a.field: a, b.field: b}
    if len(pair) != 2 or "tissue_general" not in pair:
        return False
    tissue = pair["tissue_general"]
    outer = next(m for f, m in pair.items() if f != "tissue_general")
    exact = put_right(outer.score) and (outer.field == "disease" or tissue.score >= 1.0)  # "lung adeno" too
    # a sub-site named exactly inside a cell type's name or description: "cells lining the air sacs"
    site = outer.field == "cell_type" and tissue.entry.narrower and put_right(tissue.score)
    # one wording that is exactly a name of a tissue and of a disease names both: "psoriatic plaque"
    if outer.field == "disease" and tissue.span == outer.span:
        return tissue.score >= 1.0 and outer.score >= 1.0
    return (exact or site) and outer.span.contains(tissue.span) and outer.span.length > tissue.span.length


@dataclass
class ResolvedPrompt:
    """A prompt resolved to condition fields.

    ``fields``: per field a vocabulary label, or None where the prompt does not name the field
    (the generator marginalises over it). ``confidence``: the match score in [0, 1] (1: exact
    normalised match; else the cosine similarity of span and name; for a group, times
    ``GROUP_DISCOUNT`` and 1 / number of candidates); 0 where None. ``spans``: the prompt
    text each field was read from. ``candidates``: per field, labels with weights summing to
    1 — one label with weight 1 for a leaf match, the group's children in the vocabulary
    (equal weights: the prompt does not say which) for a parent name such as "T cells", every
    label of a list ("lung and liver"), empty where the field is None; ``fields`` then holds the
    child whose names are nearest the span (for a list, its first label).
    ``groups``: the parent group named, if any. ``unresolved``: per field, the prompt's text
    for it where it names something this model cannot give: a structured value that matched
    no label above the threshold, or a Census label outside the vocabulary (the field is then
    None: the generator leaves it out with a warning, or refuses the prompt if it names nothing
    else; evaluation marginalises it). ``absent``: for the latter, the Census label named.
    ``narrowed``: per field, the prompt's text where it names a label narrower than the model's
    (``narrower.yaml``: "Kupffer cells"; or an ontology term below it), which ``fields`` answers with the model's label
    ("macrophage"; the generator warns).
    ``structured``: whether the prompt had recognised "key: value" pairs.
    ``markers``: where the prompt names no cell type in words, the marker genes it was read from
    ("SCGB1A1+"; :class:`~clopdit_dist.models.marker_table.MarkerTable`), else "".
    ``assays``: the model's assays the prompt names ("10x 3' v3"; several for a family name such as
    "10x 3'"; :mod:`~clopdit_dist.data.assay_names`), else empty. ``assay_text``: what the assay was
    read from, or an "assay:" value that names none. ``assay_absent``: Census assays the prompt
    names that the model was not trained on (``assays`` is then empty).
    ``excluded``: per field, the labels the prompt asked for by a group or list and then excluded
    ("dendritic cells, but not the plasmacytoid type"; :mod:`~clopdit_dist.data.prompt_scope`).
    ``shares``: the share of cells of each listed cell type where the prompt states them ("70% classical and 30%
    non-classical monocytes", "a 1:1 mix of CD4 and CD8 T cells"), else empty (the generator then draws the types in
    their training proportions).
    """

    fields: dict[str, str | None]
    confidence: dict[str, float]
    spans: dict[str, str | None]
    candidates: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    groups: dict[str, str | None] = field(default_factory=dict)
    unresolved: dict[str, str] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    narrowed: dict[str, str] = field(default_factory=dict)
    structured: bool = False
    prompt: str = ""
    markers: str = ""
    assays: list[str] = field(default_factory=list)
    assay_text: str = ""
    assay_absent: list[str] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)

    def condition(self) -> dict[str, str]:
        """The named fields only (a partial condition meta)."""
        return {f: v for f, v in self.fields.items() if v is not None}

    def structured_prompt(self) -> str:
        """The resolved fields as "cell type: X; tissue: Y" (what field-mode conditioning parses)."""
        return "; ".join(f"{FIELD_NAMES[f]}: {v}" for f, v in self.fields.items() if v is not None)


def prompt_error(prompt: str, why: str) -> PromptError:
    return PromptError(f"prompt {prompt!r}: {why}. Name a cell type, a tissue and/or a disease, "
                       f"e.g. {EXAMPLE_PROMPT!r}, 'CD8 T cells from a lung tumour' or just 'lung'.")
