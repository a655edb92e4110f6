"""Captions: the canonical format, training augmentation, and the held-out paraphrase set
that training must never produce."""

import re

import numpy as np
import pytest

from clopdit_dist.data import biology
from clopdit_dist.data import captions as C
from clopdit_dist.data.captions import CaptionBuilder
from clopdit_dist.data.conditions import condition_ids
from clopdit_dist.data.manifest import Manifest

LEAVES = [c.name for c in biology.LEAF_TYPES]
TISSUES = [t.name for t in biology.TISSUES]
DISEASES = [d.name for d in biology.DISEASES]
MARKERS = {c.name: list(c.markers) + ["GAPDH", "ACTB", "B2M"] for c in biology.LEAF_TYPES}

META = {"cell_type": "CD8-positive, alpha-beta T cell", "tissue_general": "lung", "disease": "lung adenocarcinoma"}


def _metas():
    """Every leaf type in every tissue under every disease, plus an unknown label."""
    out = [{"cell_type": ct, "tissue_general": t, "disease": d} for ct in LEAVES for t in TISSUES for d in DISEASES]
    return out + [{"cell_type": "Mueller cell", "tissue_general": "retina", "disease": "glaucoma"}]


def _contains(text: str, phrase: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(phrase.lower()) + r"(?!\w)", text.lower()) is not None


def test_canonical_format():
    b = CaptionBuilder({"CD8-positive, alpha-beta T cell": ["CD8A", "GZMK", "CCL5", "CD8B"]})
    assert b.canonical(META) == ("cell type: CD8-positive, alpha-beta T cell; tissue: lung; organism: Homo sapiens; "
                                 "disease: lung adenocarcinoma; markers: CD8A, GZMK, CCL5")
    # a type without markers, and a missing field
    assert b.canonical({"cell_type": "hepatocyte", "tissue_general": "liver"}) == \
        "cell type: hepatocyte; tissue: liver; organism: Homo sapiens"


def test_from_manifest_takes_the_top_markers(shards_dir):
    m = Manifest.load(shards_dir)
    b = CaptionBuilder.from_manifest(m)
    ct = next(iter(m.data["markers"]))
    expected = [r["feature_name"] for r in m.data["markers"][ct][:3]]
    assert b.canonical({"cell_type": ct}).endswith("markers: " + ", ".join(expected))
    assert all(len(v) <= C.MARKER_POOL for v in b.markers.values())


def test_tables_cover_the_atlas_and_are_disjoint():
    for kind, labels in (("cell_type", LEAVES), ("tissue", TISSUES), ("disease", DISEASES)):
        train = C._TRAIN_TABLES[kind]
        every_train = [n for lab in train for n in C.train_names(kind, lab)]
        for tier, tables in C.HELDOUT_TIERS.items():
            held = tables[kind]
            assert set(labels) <= set(train) and set(labels) <= set(held), (kind, tier)
            for lab in held:
                for h in held[lab]:
                    assert not any(_contains(t, h) for t in every_train), (kind, tier, h)


def test_augment_is_deterministic_and_varied():
    b = CaptionBuilder(MARKERS)
    a1 = [b.augment(META, np.random.default_rng(3)) for _ in range(2)]
    assert a1[0] == a1[1]
    rng = np.random.default_rng(0)
    many = [b.augment(META, rng) for _ in range(300)]
    assert len(set(many)) > 200
    assert b.canonical(META) in many  # the canonical wording is among the training wordings
    assert any(s.startswith("a ") or s.startswith("A ") for s in many)  # natural-language templates
    assert any("\n" in s for s in many) and any(" | " in s for s in many)
    assert any(_contains(s, "LUAD") for s in many) and any(_contains(s, "cytotoxic T cell") for s in many)
    # cell type dropped rarely, markers subsets of the top 8
    with_ct = sum(any(_contains(s, n) for n in C.train_names("cell_type", META["cell_type"])) for s in many)
    assert with_ct / len(many) > 0.9
    pool = set(MARKERS[META["cell_type"]][:C.MARKER_POOL])
    genes = {g for s in many for g in re.findall(r"\b[A-Z0-9]{3,}\b", s)} & set(biology.named_genes())
    assert genes <= pool | {"CD8", "CD8A"} and "B2M" not in genes  # B2M is 9th: never drawn


def test_training_never_emits_heldout_wording():
    b = CaptionBuilder(MARKERS)
    rng = np.random.default_rng(1)
    train = [b.augment(m, rng) for m in _metas() for _ in range(3)]
    held = {h for tiers in C.HELDOUT_TIERS.values() for tables in tiers.values() for names in tables.values()
            for h in names}
    for h in held:
        hits = [t for t in train if _contains(t, h)]
        assert not hits, (h, hits[:3])
    # the literal words of held-out templates
    fragments = {f.strip(" ,;[]") for t in C.TEMPLATES_HELDOUT for part in t for p in part[1:]
                 for f in re.split(r"\{\w+\}", p)}
    fragments = {f for f in fragments if len(f) >= 6}
    assert len(fragments) >= 8
    for f in fragments:
        assert not any(_contains(t, f) for t in train), f
    # and paraphrases do use them
    para = [b.paraphrase(m, rng) for m in _metas()[:50]]
    assert all(any(_contains(p, f) for f in fragments) for p in para)


def test_paraphrase_keeps_the_condition_in_other_words():
    b = CaptionBuilder(MARKERS)
    p = b.paraphrase(META, np.random.default_rng(0))
    assert any(_contains(p, h) for h in C.CELL_TYPE_HELDOUT[META["cell_type"]])
    assert any(_contains(p, h) for h in C.TISSUE_HELDOUT["lung"])
    assert any(_contains(p, h) for h in C.DISEASE_HELDOUT["lung adenocarcinoma"])
    assert "CD8A" in p
    assert not _contains(p, META["cell_type"])
    rare = b.paraphrase(META, np.random.default_rng(0), tier="rare")
    assert any(_contains(rare, h) for h in C.CELL_TYPE_RARE[META["cell_type"]])
    assert any(_contains(rare, h) for h in C.TISSUE_RARE["lung"])
    with pytest.raises(ValueError, match="tier"):
        b.paraphrase(META, np.random.default_rng(0), tier="obscure")


def test_unknown_labels_fall_back():
    b = CaptionBuilder({})
    meta = {"cell_type": "CD4-positive, alpha-beta cytotoxic T cell", "tissue_general": "retina", "disease": "glaucoma"}
    names = C.train_names("cell_type", meta["cell_type"])
    assert names[0] == meta["cell_type"] and "CD4+ cytotoxic T cell" in names
    assert "cell type: CD4-positive, alpha-beta cytotoxic T cell; tissue: retina" in b.canonical(meta)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = b.augment(meta, rng)
        assert s.strip()
    assert _contains(b.paraphrase(meta, rng), "glaucoma")


def test_condition_keys_and_ids():
    b = CaptionBuilder({})
    assert b.condition_key(META) == "CD8-positive, alpha-beta T cell|lung|lung adenocarcinoma"
    batch = {"cell_type": ["a", "a", "b"], "tissue_general": ["x", "x", "x"], "disease": ["n", "n", "n"]}
    keys = b.batch_keys(batch)
    ids = condition_ids(keys)
    assert ids.dtype == np.int64 and ids[0] == ids[1] != ids[2]
    # fixed across processes and versions: a stable hash, not Python's salted hash()
    assert condition_ids(["a|x|n"])[0] == condition_ids(["a|x|n"])[0] == ids[0]
    assert len(b.batch(batch, "augment", np.random.default_rng(0))) == 3
    with pytest.raises(ValueError, match="rng"):
        b.batch(batch, "augment")


def test_zero_shot_captions():
    b = CaptionBuilder({})
    assert b.zero_shot_captions(["hepatocyte", "Mueller cell"]) == ["cell type: hepatocyte", "cell type: Mueller cell"]
    para = b.zero_shot_captions(LEAVES, "paraphrase")
    assert len(set(para)) == len(LEAVES)
    # reworded: single-word labels ("macrophage") keep their word in new phrasing, most
    # others do not; rare names never contain the label
    assert np.mean([not _contains(p, ct) for ct, p in zip(LEAVES, para)]) > 0.5
    for ct, p in zip(LEAVES, b.zero_shot_captions(LEAVES, "rare")):
        assert not _contains(p, ct), (ct, p)
    rng_para = b.zero_shot_captions(LEAVES, "paraphrase", rng=np.random.default_rng(0))
    assert rng_para != para
    with pytest.raises(ValueError, match="canonical"):
        b.zero_shot_captions(LEAVES, "free")
