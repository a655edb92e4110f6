"""The evaluation's prompt tiers, frozen before any result was looked at.

For a held-out condition (cell type, tissue, disease):

* ``canonical``: the plain structured prompt ``"cell type: X; tissue: Y; disease: Z"`` with
  the CELLxGENE labels and no marker list (a marker list names the type by itself).
* ``reworded``: the same structure with the held-out *reworded* names of each field
  (``data/vocab/heldout_reworded.yaml``: other surface forms a user types), no markers.
* ``freeform``: a held-out sentence (``data/vocab/heldout_sentences.yaml``) with the
  reworded names: neither the wording nor the names occur in training.
* ``type_only`` / ``tissue_only``: field subsets. A type-only prompt is judged by cell-type
  identity; a tissue-only prompt by the cell-type composition it yields against the real
  composition of that tissue (total-variation distance).
* ``assay`` (session 25): the canonical prompt with the assay of the condition's held-out real
  cells (the most common one where they have several), ``"...; assay: 10x 3' v3"``: the
  Census ``assay`` label, as a user who knows their protocol would name it. Not a floor's tier
  (the floors read ``canonical``): it measures what naming the assay gives.
* ``markers``: the training caption template with its marker list (CLOP-DiT's canonical
  caption), kept as a reference, not as a tier a floor is measured on.

Each condition gets one prompt per tier, drawn with a generator seeded by the condition
key, so the prompts are the same in every run and for every model.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

import numpy as np
import yaml

from ..data.captions import CaptionBuilder, heldout_names

TIERS = ("canonical", "reworded", "freeform", "type_only", "assay")


@cache
def heldout_sentences() -> dict[str, tuple[str, ...]]:
    text = resources.files("clopdit_dist.data").joinpath("vocab/heldout_sentences.yaml").read_text()
    return {k: tuple(v) for k, v in yaml.safe_load(text).items()}


def _rng(meta: dict, tier: str) -> np.random.Generator:
    key = "|".join([tier] + [meta.get(f, "") for f in ("cell_type", "tissue_general", "disease")])
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def _reworded(kind: str, label: str, rng) -> str:
    names = heldout_names(kind, label, "reworded")
    return names[int(rng.integers(len(names)))] if names else label


def tier_prompt(meta: dict, tier: str, builder: CaptionBuilder | None = None) -> str:
    """The frozen prompt of ``tier`` for the condition ``meta``."""
    ct, tissue, disease = meta["cell_type"], meta["tissue_general"], meta["disease"]
    rng = _rng(meta, tier)
    if tier == "canonical":
        return f"cell type: {ct}; tissue: {tissue}; disease: {disease}"
    if tier == "reworded":
        return (f"cell type: {_reworded('cell_type', ct, rng)}; tissue: {_reworded('tissue', tissue, rng)}; "
                f"disease: {_reworded('disease', disease, rng)}")
    if tier == "freeform":
        healthy = disease == "normal"
        sentences = heldout_sentences()["healthy" if healthy else "with_disease"]
        sentence = sentences[int(rng.integers(len(sentences)))]
        return sentence.format(cell_type=_reworded("cell_type", ct, rng), tissue=_reworded("tissue", tissue, rng),
                               disease="" if healthy else _reworded("disease", disease, rng))
    if tier == "assay":
        return f"cell type: {ct}; tissue: {tissue}; disease: {disease}; assay: {meta['assay']}"
    if tier == "type_only":
        return f"cell type: {ct}"
    if tier == "tissue_only":
        return f"tissue: {tissue}"
    if tier == "markers":
        if builder is None:
            raise ValueError("the 'markers' tier needs the run's CaptionBuilder (its marker table)")
        return builder.canonical(meta)
    raise ValueError(f"tier={tier!r}: choose one of {TIERS + ('tissue_only', 'markers')}")
