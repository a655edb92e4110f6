"""The prompt resolver on the development prompts of ``benchmarks/prompts/resolver_dev.yaml``
(free-form wordings written for finding the resolver's errors; not a held-out set).

Right, per field: the resolved label is the expected one and no other candidate is kept; for a
``{group: [...]}`` expectation, the candidates are exactly those members, whether the prompt named their group
or listed them ("CD4 and CD8 T cells"; until session 28 a list did not count); for ``{any: [...]}``,
the resolved label (or None) is one of them. A prompt is right when all three fields are.
A prompt that contains one of the evaluation's held-out names (``vocab/heldout_*.yaml``, read
for that check only) is refused: the set must not tune the resolver to the held-out wording.
One JSON line, with the wrong prompts and what they resolved to.

    python benchmarks/resolver_dev.py --shards SHARDS --out benchmarks/results/resolver_dev.jsonl --name NAME

``--prompts benchmarks/prompts/resolver_dev_s23.yaml``: the second set (session 23), written before any run on it;
``resolver_dev_s24.yaml`` (cells described, not named) and ``resolver_dev_s24b.yaml`` / ``_s24c.yaml`` (the same and
marker genes, written by helpers that read none of the project's files); ``resolver_dev_s26a.yaml`` / ``_s26b.yaml``
(session 26, two more such helpers: long requests with side clauses, negations, shorthand, field subsets, typos);
``resolver_dev_s28a.yaml`` to ``_s28d.yaml`` (session 28, four more, from ``helper_brief_s28.md``: metadata
strings and clinical wordings; chat-box requests; programmatic conditions and cluster annotations; a forum mix).
Several files give one line each in one process. ``--run RUN``: resolve as that run's generator does, reading marker
genes with its marker table. ``--drop-heldout``: leave out and count prompts that contain a held-out name (sets written
by people who were not shown the held-out names) instead of refusing the set.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml
from _measure import emit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "resolver_dev.yaml")


def field_right(expected, label: str | None, candidates: list[tuple[str, float]], group: str | None) -> bool:
    if isinstance(expected, dict) and "group" in expected:  # the members, named as their group or one by one
        return {c for c, _ in candidates} == set(expected["group"])
    if isinstance(expected, dict) and "any" in expected:
        return label in expected["any"]
    # a group with one child in the vocabulary ("tumour": lung adenocarcinoma only) generates as that child
    return label == expected and {c for c, _ in candidates} <= {expected}


def heldout_names() -> set[str]:
    """The evaluation's held-out names (reworded and rare tiers) that are not also training names, normalised."""
    from clopdit_dist.data.conditions import heldout_tables, normalize_name, train_names, train_tables

    train = {normalize_name(n) for kind, table in train_tables().items() for label in table
             for n in train_names(kind, label)}
    return {normalize_name(n) for tier in ("reworded", "rare") for table in heldout_tables(tier).values()
            for names in table.values() for n in names} - train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard set (its manifest's training labels are the vocabulary)")
    p.add_argument("--name", default="resolver")
    p.add_argument("--out", default=None)
    p.add_argument("--prompts", nargs="+", default=[PROMPTS],
                   help="development prompt files (default resolver_dev.yaml); one line each, named NAME "
                        "prefixed by the file's suffix after 'resolver_dev' where there are several")
    p.add_argument("--run", default=None, help="a run trained on --shards: resolve as its generator does, marker genes "
                                               "included (without it: the words alone)")
    p.add_argument("--drop-heldout", action="store_true",
                   help="leave out (and count) prompts with a held-out name in them instead of refusing the set: "
                        "for sets written by people who were not shown the held-out names")
    args = p.parse_args()

    from clopdit_dist.data.manifest import Manifest
    from clopdit_dist.models.prompt_resolver import PromptResolver
    from clopdit_dist.models.text import TextTower

    if args.run:  # the run's own resolver: the shards' vocabulary and the run's marker table
        from clopdit_dist.generate import CellGenerator

        resolver = CellGenerator.from_run(args.run).resolver
    else:
        resolver = PromptResolver.from_manifest(TextTower("minilm", normalize=True), Manifest.load(args.shards))
    held = heldout_names()
    for path in args.prompts:
        name = args.name if len(args.prompts) == 1 else \
            os.path.splitext(os.path.basename(path))[0].removeprefix("resolver_dev") + "_" + args.name
        score(resolver, path, held, name, args)


def score(resolver, path: str, held: set[str], name: str, args) -> None:
    from clopdit_dist.data.conditions import CONDITION_FIELDS, normalize_name

    items = yaml.safe_load(open(path))
    clash = [it["prompt"] for it in items if any(f" {h} " in f" {normalize_name(it['prompt'])} " for h in held)]
    if clash and args.drop_heldout:
        items = [it for it in items if it["prompt"] not in clash]
    elif clash:
        raise SystemExit(f"development prompts with a held-out name in them: {clash}")
    right = {f: 0 for f in CONDITION_FIELDS}
    wrong = []
    for it in items:
        r = resolver.resolve(it["prompt"], allow_empty=True)
        ok = {f: field_right(it[f], r.fields[f], r.candidates[f], r.groups[f]) for f in CONDITION_FIELDS}
        for f in CONDITION_FIELDS:
            right[f] += ok[f]
        if not all(ok.values()):
            wrong.append({"prompt": it["prompt"],
                          **{f: r.groups[f] or r.fields[f] for f in CONDITION_FIELDS if not ok[f]}})
    n = len(items)
    emit(args.out, [], bench="resolver_dev", name=name, prompts=os.path.basename(path), run=args.run, n=n,
         dropped_heldout=len(clash),
         **{f"right_{f}": round(right[f] / n, 4) for f in CONDITION_FIELDS},
         right_all=round((n - len(wrong)) / n, 4), wrong=wrong)


if __name__ == "__main__":
    main()
