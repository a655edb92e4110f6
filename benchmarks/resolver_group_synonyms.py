"""Training-side check of the prompt resolver's group-synonym matching (a cell-type name with a
parent-group name inside it swapped for another name of that group is that name: "cytotoxic T
lymphocyte" is "cytotoxic T cell"), with and without the rule, on two sets built from TRAINING
names only:

* ``leave_one_out``: every training name of every cell-type label, resolved as a prompt with its
  own normalised form left out of the table (so it is found through another name or not at all);
* ``group_swaps``: each training name with a group name inside it swapped for another name of
  that group, left out of the table likewise; wordings that happen to be held-out names are
  dropped (the held-out tables are read for that only, and how many were dropped is reported).

Right = the cell_type field is the label and no group is kept. ``lost`` lists what the rule
breaks. One JSON line per set.

    python benchmarks/resolver_group_synonyms.py --shards SHARDS --out benchmarks/results/resolver_group_synonyms.jsonl
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from _measure import emit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard set (its manifest's training labels are the vocabulary)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from clopdit_dist.data.conditions import heldout_tables, normalize_name, train_conditions, train_names, \
        vocab_from_conditions
    from clopdit_dist.data.manifest import Manifest
    from clopdit_dist.models.prompt_resolver import PromptResolver
    from clopdit_dist.models.text import TextTower

    vocab = vocab_from_conditions(train_conditions(Manifest.load(args.shards)))
    resolver = PromptResolver(TextTower("minilm", normalize=True), vocab)
    rule, score_spans = resolver._group_names, resolver.score_spans
    held = {normalize_name(h) for tier in ("reworded", "rare") for table in heldout_tables(tier).values()
            for names in table.values() for h in names}
    sets: dict[str, list[tuple[str, str]]] = {"leave_one_out": [], "group_swaps": []}
    dropped = 0
    for label in vocab["cell_type"]:
        for name in train_names("cell_type", label):
            sets["leave_one_out"].append((label, name))
            for f, variant in resolver._group_synonym_variants(normalize_name(name)):
                if f != "cell_type" or variant == normalize_name(name):
                    continue
                if variant in held:
                    dropped += 1
                    continue
                sets["group_swaps"].append((label, variant))

    def right(on: bool, items: list[tuple[str, str]]) -> list[bool]:
        resolver._group_names = rule if on else {}
        out = []
        for label, text in items:
            resolver.score_spans = functools.partial(score_spans, exclude_norms=frozenset({normalize_name(text)}))
            r = resolver.resolve(text, allow_empty=True)
            out.append(r.fields["cell_type"] == label and r.groups["cell_type"] is None)
        return out

    results: list[dict] = []
    for name, items in sets.items():
        items = list(dict.fromkeys(items))
        without, with_rule = right(False, items), right(True, items)
        emit(args.out, results, bench="resolver_group_synonyms", set=name, n=len(items),
             right_without_rule=sum(without), right_with_rule=sum(with_rule),
             gained=[t for (_, t), a, b in zip(items, without, with_rule) if b and not a],
             lost=[t for (_, t), a, b in zip(items, without, with_rule) if a and not b],
             **({"dropped_as_heldout_names": dropped} if name == "group_swaps" else {}))


if __name__ == "__main__":
    main()
