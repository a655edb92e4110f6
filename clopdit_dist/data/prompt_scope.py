"""Which words of a free-text prompt ask for cells, which only give context, and which exclude.

People ask for cells inside a story: "We already have plenty of ciliated cells. What I need now are
the surfactant-secreting cells of the alveoli, so I can compare them with the macrophages we
sequenced", "monocytes, but not the CD16+ ones", "non-ciliated airway cells". Read as one bag of
names, such a prompt generated the cells it mentions in passing (a blind development set of session
26, ``benchmarks/prompts/resolver_dev_s26a.yaml``: 10 of its 12 long requests got a cell type named
only as context). :func:`read_scope` splits the free text by cue words alone (no model):

* **asked**: the sentences and ";"-parts that carry a request ("generate", "simulate", "I need",
  "could you", "please", ...), or every one of them when none does, without their asides;
* **context**: the other sentences and parts, without their asides;
* **asides**: what follows a comparison ("to compare them with X", "contrast", "combine them with"),
  what the user already has ("we already have X", "our data has lots of X") or will add ("we'll add
  X later"), and the object of a relative clause about what the cells do to others ("cells that
  cross-present to naive CD8 T cells"), each up to the end of its clause; and a study's design
  ("for an NAFLD vs control comparison") by itself;
* **excluded**: what follows a negation ("not", "neither ... nor", "excluding", "except", "other
  than", "rather than", "instead of", "isn't", "aren't", "as opposed to", "unlike", "minus", "drop", "remove",
  "leave out") up to the end of its clause or the next preposition after its first word ("any kind of" and "the
  whole" before it are part of it), and "X cells" for a "non-X" word that begins no name the model knows
  ("non-ciliated", not "non-classical");
* **kept**: what a "keep" or "retain" clause keeps in ("... except T cells and B cells. Keep the plasma
  cells."): never excluded, and not asked for anew;
* **held open**: the fields the asked parts leave open ("I just want Tregs, no particular organ"), which the
  resolver then takes from neither context nor asides.

A pasted chat ("User: ... Assistant: ... User: ...") is split by :func:`user_turns`: the resolver reads its last user
turn as the prompt and the user's earlier turns as context (:func:`with_context`; what the last turn leaves out,
"the matching blood monocytes from the same patients"); the assistant's turns are not read.

The resolver reads a cell type from asked, then context; a tissue or disease from asked, then
context, then asides (a side clause's tissue is usually the study's: "we have lupus PBMCs"); it
never reads excluded text as asked for, and removes the labels it names from a group or list the
prompt asks for ("dendritic cells, but not the plasmacytoid type": conventional DCs). A field left
open on purpose ("any tissue", "whatever disease", "regardless of cell type") is taken out of the
text, so nothing is read for it; so is a reference back ("from the same tissue"), whose field comes from the
context; and so is "control" said of the experiment ("as an in-silico control", "a
negative control"), which is no healthy donor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

# a sentence or ";"-part that asks for something
REQUEST = re.compile(
    r"\b(?:please|pls|generate|simulate|synthesi[sz]e|produce|create|make|give|show|need|want|would\s+like|"
    r"(?:i|we)'d\s+like|looking\s+for|can\s+you|could\s+you|get\s+me|request)\b", re.IGNORECASE)
# comparisons: "so I can compare them with X", "to contrast against X", "we'll combine them with X"; from the cue
# on, also outside a request ("Are type I pneumocytes depleted in LUAD compared with normal lung?")
COMPARISON = re.compile(r"\b(?:compar|contrast|combin|benchmark|pair)\w*(?:\s+(?:it|them|these|those|this|that))?"
                        r"\s+(?:with|against|to|alongside|versus)\b", re.IGNORECASE)
# asides: the removed text starts at the group "cut" and runs to the end of the clause
ASIDES = [re.compile(p, re.IGNORECASE) for p in (
    # plans: "we'll add X", "we will take X from a public atlas"
    r"\b(?:we|i)\s*(?:'ll|will|would|'d|'re\s+going\s+to|plan\s+to)\s+(?:also\s+|then\s+|later\s+)?"
    r"(?P<cut>(?:add|take|use|get|pull|combine|contrast|compare|bring|supply|borrow|merge|integrate|source)\b)",
    # what the user has: "we already have X", "our blood dataset has lots of X", "I sequenced X"
    r"\b(?:we|i|our(?:\s+[\w'-]+){0,3}?\s+(?:data(?:set)?s?|atlas|cohort|samples?|study|lab|reference))"
    r"\s+(?:already\s+)?(?P<cut>(?:ha(?:ve|s|d)|got|sequenced|profiled|captured|collected)\b)",
    r"(?P<cut>\balready\s+(?:ha(?:ve|s|d)|got|in|sequenced|profiled|captured|collected)\b)",
)]
# the design of a study, an aside by itself (the clause goes on: "for our UC vs healthy comparison we need X")
STUDY_DESIGN = re.compile(r"\b[\w-]+\s+(?:vs\.?|versus)\s+[\w-]+\s+(?:comparison|contrast|study|analysis|design)s?\b",
                          re.IGNORECASE)
# the object of a relative clause about what the cells do to other cells: "CLEC9A+ antigen-presenting cells that
# cross-present to naive CD8 T cells", "macrophages which engulf neutrophils". The clause's verb stays (it may
# describe the cells asked for: "cells that kill virus-infected cells"); what it acts on is an aside, from the
# object on, whether or not the sentence is a request
RELATIVE_OBJECT = re.compile(
    r"\b(?:that|which|who)\s+(?:\w+ly\s+|can\s+|may\s+|will\s+)?"
    r"(?:cross[\s-]?present|present|prime|activate|kill|lyse|suppress|help|engulf|phagocytose|recruit|attract|"
    r"interact|support|licen[cs]e|stimulate|inhibit|target)(?:s|d|ed)?(?:\s+antigens?)?(?:\s+(?:to|with|on))?\s+"
    r"(?P<cut>)", re.IGNORECASE)
NEGATION = re.compile(
    r"\b(?:not|neither|nor|excluding|exclude|except(?:\s+for)?|other\s+than|rather\s+than|instead\s+of|"
    r"apart\s+from|aren't|isn't|are\s+not|is\s+not|minus|as\s+opposed\s+to|in\s+contrast\s+to|unlike|"
    # verbs that take cells out: "drop plasma cells too", "remove the Tregs", "leave out B cells" (not "Drop-seq")
    r"drop(?![-\w])|dropping|remove|removing|omit|omitting|leave\s+out|leaving\s+out|filter\s+out|"
    r"forget(?:\s+about)?)\b",
    re.IGNORECASE)
# what an exclusion says of its cells before naming them, part of its scope: "except any kind of macrophage", "minus
# the whole B lineage" (the scope otherwise ends at the first preposition after its first word)
_QUANTIFIER = re.compile(
    r"\s*(?:(?:any|all|every|each|the)\s+)?(?:(?:kinds?|types?|sorts?|forms?|subsets?|subtypes?)\s+of\s+"
    r"|(?:whole|entire)\s+)", re.IGNORECASE)
# a clause that keeps cells in ("Keep the plasma cells.", "but retain the NK cells"): its cells are not excluded,
# and it asks for nothing new
KEEP = re.compile(r"\b(?:keep|keeping|retain|retaining)\b", re.IGNORECASE)
# a field left open on purpose: "any tissue", "whatever disease", "regardless of (the) cell type"; not
# "without any disease", "w/o any disease", "free of any disease", which say healthy (shorthand.yaml)
OPEN_FIELD = re.compile(
    r"(?<!without\s)(?<!w/o\s)(?<!free\sof\s)\b(?:any|whatever|whichever|every|all|regardless\s+of(?:\s+the)?|"
    r"across(?:\s+all)?|no\s+particular|no\s+specific)\s+"
    r"{field}(?:\s*(?:,|/|\bor\b|\band\b|\bnor\b)\s*{field})*\b"
    # said unspecified: "No disease condition was specified", "tissue not given", "unspecified disease"
    r"|\bno\s+{field}\s+{be}(?:{said})\b|\b{field}\s+{be}(?:not\s+|un)(?:{said}|known)\b"
    r"|\bunspecified\s+{field}"
    .format(field=r"(?:cell[\s-]?types?|tissues?|organs?|diseases?|disease\s+(?:conditions?|states?)|conditions?)",
            be=r"(?:(?:was|were|is|are|has\s+been|have\s+been)\s+)?",
            said="specified|given|stated|provided|requested|mentioned"), re.IGNORECASE)
# a reference back to what was said before ("from the same tissue", "the same patients"): it names no field
# itself (read by similarity, "the same tissue, but" was lung), so the field is read from the context
SAME_AS = re.compile(r"\b(?:the\s+)?(?:same|identical)\s+(?:tissues?|organs?|patients?|donors?|individuals?|"
                     r"subjects?|samples?|diseases?|conditions?|cohorts?)\b", re.IGNORECASE)


def open_fields(text: str) -> set[str]:
    """The fields ``text`` leaves open on purpose (:data:`OPEN_FIELD`): {"tissue_general"} for "any tissue"."""
    words = {"cell": "cell_type", "tissue": "tissue_general", "organ": "tissue_general", "disease": "disease",
             "condition": "disease"}
    return {f for m in OPEN_FIELD.finditer(text) for w, f in words.items() if w in m.group(0).lower()}


# "control" as a part of the experiment, not a healthy donor: "as an in-silico control", "a negative control"
DESIGN_CONTROL = re.compile(
    r"\b(?:as\s+an?\s+(?:(?:in[\s-]?silico|negative|positive|internal|technical|baseline)\s+)?control|"
    r"(?:in[\s-]?silico|negative|positive|internal|technical|spike[\s-]?in)\s+controls?)\b", re.IGNORECASE)
# a pasted chat's turns: a role and a colon at a line's start ("User: ...", "Assistant: ...")
_TURN = re.compile(r"^[ \t]*(user|human|me|assistant|ai|bot|chatgpt|gpt|model|system)[ \t]*:[ \t]*",
                   re.IGNORECASE | re.MULTILINE)
_USER_ROLES = frozenset({"user", "human", "me"})
_NON = re.compile(r"\bnon[- ]([a-z][\w-]*)", re.IGNORECASE)  # "non-ciliated", "non ciliated"; not "none", "nonetheless"
_SENTENCE = re.compile(r"(?<=[.?!])\s+|[;\n]+")
_CLAUSE_END = re.compile(r"[,;:.?!()]|\bbut\b", re.IGNORECASE)
_PREPOSITION = re.compile(r"\b(?:from|in|of|with|at|on)\b", re.IGNORECASE)


@dataclass
class PromptScope:
    """A prompt's free text split by what it does (module docstring); each part keeps its
    sentences as ";"-separated segments."""

    asked: str
    context: str = ""
    asides: str = ""
    excluded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what a "keep ..." clause keeps in (never excluded)
    split: bool = False  # whether anything was set apart or taken out (else read the text as it is)
    held_open: frozenset[str] = frozenset()  # fields the asked parts leave open: not read from context or asides


def _clause_end(text: str, start: int) -> int:
    m = _CLAUSE_END.search(text, start)
    return m.start() if m else len(text)


def _clause_start(text: str, end: int) -> int:
    starts = [m.end() for m in _CLAUSE_END.finditer(text, 0, end)]
    return starts[-1] if starts else 0


def _negated_end(text: str, start: int) -> int:
    """The end of a negation's scope: the clause end, or a preposition after its first word
    ("aren't airway cells from normal lung" excludes "airway cells")."""
    end = _clause_end(text, start)
    q = _QUANTIFIER.match(text, start, end)
    first = re.search(r"\S+", text[q.end() if q else start:end])
    if first:
        m = _PREPOSITION.search(text, (q.end() if q else start) + first.end(), end)
        if m:
            end = m.start()
    return end


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    out, at = [], 0
    for a, b in sorted(spans):
        if a >= at:
            out.append(text[at:a])
            at = b
        else:
            at = max(at, b)
    return " ".join(" ".join(out + [text[at:]]).split())


def user_turns(text: str) -> list[str] | None:
    """A pasted chat's user turns, in order, without their role markers (None for text that is no chat: fewer
    than two turns, or none a user's). The resolver reads the last as the prompt and the earlier ones as its
    context (:func:`with_context`); the assistant's turns are not read."""
    marks = list(_TURN.finditer(text))
    roles = [m.group(1).lower() for m in marks]
    if len(marks) < 2 or not set(roles) & _USER_ROLES:
        return None
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [" ".join(text[m.end():end].split()) for m, role, end in zip(marks, roles, ends) if role in _USER_ROLES]


def with_context(scope: PromptScope, earlier: list[str]) -> PromptScope:
    """``scope`` with ``earlier`` (a chat's earlier user turns) read after its own context."""
    context = "; ".join(p for p in (scope.context, *earlier) if p)
    return replace(scope, context=context, split=scope.split or bool(context))


def read_scope(text: str, names_a_label: Callable[[str], bool] = lambda _: False) -> PromptScope:
    """``text`` split into asked, context, asides and excluded parts (module docstring).
    ``names_a_label(word)``: whether a "non-X" word begins one of the model's names (it is then
    a name, "non-classical", not a negation)."""
    asked, context, asides, excluded, kept, split = [], [], [], [], [], False
    held_open: set[str] = set()
    parts = [p for p in _SENTENCE.split(text) if p and p.strip()]
    requests = [bool(REQUEST.search(p)) for p in parts]
    for part, is_request in zip(parts, requests):
        removed: list[tuple[int, int]] = [m.span() for p in (OPEN_FIELD, DESIGN_CONTROL, SAME_AS)
                                          for m in p.finditer(part)]
        for m in _NON.finditer(part):
            if not names_a_label(m.group(0)):
                removed.append(m.span())
                excluded.append(f"{m.group(1)} cells")
        for m in NEGATION.finditer(part):
            end = _negated_end(part, m.end())
            removed.append((m.start(), end))
            if part[m.end():end].strip():
                excluded.append(" ".join(part[m.end():end].split()))
        for m in KEEP.finditer(part):
            end = _clause_end(part, m.end())
            removed.append((m.start(), end))
            if part[m.end():end].strip():
                kept.append(" ".join(part[m.end():end].split()))
        side = []
        for pattern in ASIDES:
            for m in pattern.finditer(part):
                # outside a request the whole clause is the aside ("the melanocytes we'll take from an atlas");
                # inside one, from the cue on ("I want X, to compare against Y")
                start = m.start("cut") if is_request else _clause_start(part, m.start("cut"))
                side.append((start, _clause_end(part, m.end())))
        side += [(m.start(), _clause_end(part, m.end())) for m in COMPARISON.finditer(part)]
        side += [(m.start("cut"), _clause_end(part, m.end())) for m in RELATIVE_OBJECT.finditer(part)]
        side += [m.span() for m in STUDY_DESIGN.finditer(part)]
        for a, b in side:
            aside = _cut(part[a:b], [(x - a, y - a) for x, y in removed if a <= x < b])
            if aside:
                asides.append(aside)
        rest = _cut(part, removed + side)
        if is_request or not any(requests):
            held_open |= open_fields(part)
        if rest:
            (asked if is_request or not any(requests) else context).append(rest)
        split = split or bool(removed or side)
    return PromptScope("; ".join(asked), "; ".join(context), "; ".join(asides), excluded, kept,
                       split or bool(context), frozenset(held_open))
