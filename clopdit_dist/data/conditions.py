"""The condition fields a user conditions on, the condition key, the training-condition
table and prompt parsing."""

from __future__ import annotations

from .captions import CAPTION_FIELDS, CaptionBuilder

CONDITION_FIELDS = CAPTION_FIELDS
FIELD_NAMES = {"cell_type": "cell type", "tissue_general": "tissue", "disease": "disease"}


def train_conditions(manifest) -> list[dict]:
    """The (cell_type, tissue_general, disease) conditions of the training split."""
    seen = {}
    for g in manifest.data["library_size"]["groups"]:
        meta = {f: g[f] for f in CONDITION_FIELDS}
        seen.setdefault(CaptionBuilder.condition_key(meta), meta)
    return list(seen.values())


def parse_fields(prompt: str) -> dict[str, str]:
    """"cell type: B cell; tissue: lung" → {"cell_type": "B cell", "tissue_general": "lung"}."""
    names = {v: k for k, v in FIELD_NAMES.items()} | {"tissue_general": "tissue_general", "cell_type": "cell_type"}
    out = {}
    for part in prompt.replace("\n", ";").split(";"):
        if ":" in part:
            key, value = part.split(":", 1)
            key = key.strip().lower()
            if key in names and value.strip():
                out[names[key]] = value.strip()
    return out
