"""Assays named in a prompt ("10x 3' v3", "Smart-seq2", "10x Genomics Chromium v3 chemistry").

The names are the CELLxGENE Census ``assay`` labels and the other spellings in
``vocab/assays.yaml``, matched exactly after :func:`normalize_assay` (never by meaning: to a
text tower "10x 3' v3" and "10x 5' v2" are one string). A family name ("10x 3'", "Smart-seq")
names every label it covers. A structured pair ("assay: 10x 3' v3", also "technology",
"platform", "chemistry") is read by its value alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

# "key: value" pairs whose value names the assay (split_structured's other pairs, lower-cased keys)
ASSAY_KEYS = frozenset({"assay", "assays", "technology", "platform", "chemistry", "protocol", "sequencing"})

_QUOTES = re.compile(r"[’‘′`´]")
_SPLIT = re.compile(r"\b10x(?=v\d|[35]')|(?<=[35]')(?=v\d)")  # "10xv2", "10x5'v2": a space after each
_PRIME = re.compile(r"\b([35])\s*(?:-\s*)?(?:'|prime\b)")  # "3 prime", "3-prime", "5prime", "3 '", "3'"
_VERSION = re.compile(r"\bversion\s*(\d)|\bv(\d)\.\d+")  # "version 3", "v3.1"
_TEN_X = re.compile(r"\b(?:10x\s+)?(?:genomics|chromium)\b|\bsingle[\s-]cell\s+(?=[35]'|multiome)")  # 10x's names
_FILLER = re.compile(r"\b(?:reagent|kits?|library|libraries|gel|beads?|gem|gex|gene expression|next gem|gem-x|"
                     r"chemistry|immune profiling)\b|&")
_TOKENS = re.compile(r"[a-z0-9][a-z0-9'.+-]*[a-z0-9'+]|[a-z0-9]|\d'")
_WORDS = re.compile(r"[^\s=:;,()\[\]]+")  # a prompt's words: "assay=Drop-seq" is two


def normalize_assay(text: str) -> str:
    """Lower case, one quote, 3'/5' for "3 prime", vN for "version N" and "vN.M", 10x for its
    product names ("10x Genomics", "Chromium", "Single Cell 3'"), kit words dropped, one space
    between tokens: the form names and prompts are compared in."""
    s = _QUOTES.sub("'", str(text).lower()).replace("^", "")
    s = _PRIME.sub(r"\1'", s)
    s = _SPLIT.sub(lambda m: m.group() + " ", s)
    s = _VERSION.sub(lambda m: f"v{m.group(1) or m.group(2)}", s)
    s = _FILLER.sub(" ", s)
    s = _TEN_X.sub(" 10x ", s)
    words = _TOKENS.findall(s)
    return " ".join(w for i, w in enumerate(words) if not (w == "10x" and i and words[i - 1] == "10x"))


@cache
def assay_names() -> dict[str, tuple[str, ...]]:
    """Normalised name -> the Census labels it names (a label, a synonym of one, or a family)."""
    text = resources.files("clopdit_dist.data").joinpath("vocab/assays.yaml").read_text()
    table = yaml.safe_load(text)
    out: dict[str, tuple[str, ...]] = {}
    for label, synonyms in table["labels"].items():
        for name in (label, *synonyms):
            out[normalize_assay(name)] = (label,)
    for family, labels in table["families"].items():
        out.setdefault(normalize_assay(family), tuple(labels))
    return out


@dataclass
class AssaysNamed:
    """What :func:`assays_named` read: the Census ``labels`` named, in order of mention without
    repeats; the prompt's words they were read from (``spans``); the prompt without them (``rest``,
    what the condition fields are then read from: a text tower would read "v2" as something)."""

    labels: list[str]
    spans: list[str]
    rest: str


def assays_named(text: str) -> AssaysNamed:
    """The assays ``text`` names, by its words: the longest run of words whose normalised form is
    a name wins, no two on one word ("10x 3' v3" is one label, not also the family "10x 3'")."""
    words = list(_WORDS.finditer(str(text)))
    names = assay_names()
    longest = max((len(n.split()) for n in names), default=0) + 10  # room for dropped vendor and kit words
    labels, spans, rest, i = [], [], str(text), 0
    while i < len(words):
        for k in range(min(longest, len(words) - i), 0, -1):
            name = normalize_assay(" ".join(w.group() for w in words[i:i + k]))
            if name in names:
                labels += [x for x in names[name] if x not in labels]
                a, b = words[i].start(), words[i + k - 1].end()
                spans.append(text[a:b].strip(",.;:()"))
                rest = rest[:a] + " " * (b - a) + rest[b:]  # same length: later offsets still hold
                i += k
                break
        else:
            i += 1
    return AssaysNamed(labels, spans, re.sub(r" {2,}", " ", rest).strip() if spans else str(text))
