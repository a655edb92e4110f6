"""Assays in prompts: the names read, the capture estimated from training cells, and generation
that gives the named assay's library sizes, cells and capture."""

import json
import os
import shutil

import numpy as np
import pytest

from clopdit_dist.data.assay_names import assays_named, normalize_assay
from clopdit_dist.errors import PromptWarning, RunDirError

THREE = ["10x 3' v1", "10x 3' v2", "10x 3' v3", "10x 3' transcription profiling"]


def test_assay_names_are_read_exactly_in_the_spellings_people_type():
    r = assays_named("B cells, lung, 10x 3' v3")
    assert r.labels == ["10x 3' v3"] and r.spans == ["10x 3' v3"] and r.rest == "B cells, lung,"
    r = assays_named("10x Genomics Chromium Single Cell 3 prime version 3 of the lung")
    assert r.labels == ["10x 3' v3"] and r.rest == "of the lung"
    assert assays_named("10X 5’ v2 data").labels == ["10x 5' v2"]
    assert assays_named("T cells profiled with SMART-Seq2").labels == ["Smart-seq2"]
    assert assays_named("10x v3 chemistry").labels == ["10x 3' v3"]
    # 10x's product and kit words, versions with a minor number, pairs without spaces
    assert assays_named("hepatocytes profiled with Chromium Single Cell 3′ Reagent Kits v3.1").labels == ["10x 3' v3"]
    assert assays_named("10xv2 3'; goblet cells").labels == ["10x 3' v2"]
    assert assays_named("assay=Drop-seq; tissue=retina").labels == ["Drop-seq"]
    assert assays_named("the 3' UTR of CD8A; chromium exposure; single cell RNA-seq, v2 of the atlas").labels == []
    # a family name covers its labels; the longest name wins ("10x 3' v3" is not also the family)
    assert assays_named("10x 3' cells").labels == THREE
    r = assays_named("10x 3' v3 and Smart-seq2")
    assert r.labels == ["10x 3' v3", "Smart-seq2"] and r.spans == ["10x 3' v3", "Smart-seq2"]
    # no assay: "10x" alone is a factor, and a cell-type prompt names none; the text is kept as it is
    for text in ("lung cells with 10x more SFTPC", "CD8 T cells, lung"):
        assert assays_named(text).labels == [] and assays_named(text).rest == text
    assert normalize_assay("3-prime") == normalize_assay("3 prime") == "3'"


def test_the_capture_estimate_follows_the_atlas_assays_true_capture():
    """Each assay of the synthetic atlas scales every gene (``assay_capture``); the estimate from
    healthy pseudobulks of training studies, type + study effects, recovers their difference."""
    from clopdit_dist.data.synthetic import SynthConfig, SyntheticAtlas
    from clopdit_dist.models.assay_capture import capture_shift, estimate_capture

    atlas = SyntheticAtlas(SynthConfig(n_cells=4000, n_genes=600, n_studies=12, seed=7, chunk_size=1024))
    obs, x = atlas.sample(0, 4000)
    x = x.toarray()
    effects = estimate_capture(x, {k: obs[k].to_numpy() for k in ("dataset_id", "cell_type", "disease", "assay")})
    a, b = atlas.assays
    assert set(effects) == {a, b} and np.allclose(effects[a] + effects[b], 0, atol=1e-5)  # centred over assays
    expressed = x.sum(0) > 50
    truth = atlas.assay_capture[0] - atlas.assay_capture[1]
    assert np.corrcoef((effects[a] - effects[b])[expressed], truth[expressed])[0, 1] > 0.7
    # a half-and-half source moves half way; a source of the target itself does not move
    assert np.allclose(capture_shift(effects, a, {a: 1.0, b: 1.0}), (effects[a] - effects[b]) / 2, atol=1e-6)
    assert np.allclose(capture_shift(effects, a, {a: 3.0}), 0)


def test_a_prompt_naming_an_assay_gets_its_library_sizes_cells_and_capture(pca_run, shards_dir, tmp_path):
    from clopdit_dist.data.conditions import CONDITION_FIELDS
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.assay_capture import add_to_run

    gen = CellGenerator.from_run(pca_run)
    assert len(gen.assays) == 2 and set(gen.capture) == set(gen.assays)  # the DiT stage wrote the estimate
    groups = gen.library["groups"]
    # a condition whose training cells are all of one assay, asked for the other
    assays, cells = {}, {}
    for g in groups:
        key = tuple(g[f] for f in CONDITION_FIELDS)
        assays.setdefault(key, set()).add(g["assay"])
        cells[key] = cells.get(key, 0) + g["n"]
    ct, tissue, disease = max((k for k in cells if len(assays[k]) == 1), key=cells.get)
    (own,) = assays[(ct, tissue, disease)]
    other = next(a for a in gen.assays if a != own)
    base = f"cell type: {ct}; tissue: {tissue}; disease: {disease}"
    plain = gen.generate([base], n=200, seed=0)
    asked = gen.generate([f"{base}; assay: {other}"], n=200, seed=0)
    assert set(plain.obs["assay"]) == {""} and set(plain.obs["matched_assay"]) == {own}
    assert set(asked.obs["assay"]) == {other} and set(asked.obs["matched_assay"]) == {other}  # its library sizes
    assert (asked.obs["cell_type"] == ct).all() and np.array_equal(asked.obsm["X_latent"], plain.obsm["X_latent"])
    # its capture: the decoded proportions moved by the estimated effect of `other` over `own`
    shift = gen.assay_shift({"cell_type": ct, "tissue_general": tissue, "disease": disease, "assay": other})
    assert np.allclose(shift.numpy(), gen.capture[other] - gen.capture[own], atol=1e-6)
    lp = [np.log(a.X.toarray().sum(0) / a.X.sum() + 1e-6) for a in (plain, asked)]
    top = np.argsort(-plain.X.toarray().sum(0))[:50]  # genes with counts enough to see the shift
    assert np.corrcoef((lp[1] - lp[0])[top], shift.numpy()[top])[0, 1] > 0.5
    # the same assay the condition already has: nothing moves
    assert gen.assay_shift({"cell_type": ct, "tissue_general": tissue, "disease": disease, "assay": own}) is None
    # an assay alone is a prompt: that assay's training cells
    alone = gen.generate([other], n=40, seed=0)
    assert set(alone.obs["assay"]) == {other} and alone.obs["cell_type"].nunique() > 1
    # an assay the model lacks is said, and left out
    with pytest.warns(PromptWarning, match="names the assay 'Smart-seq2', which this model was not trained on"):
        smart = gen.generate([f"{base}; assay: Smart-seq2"], n=4, seed=0)
    assert set(smart.obs["assay"]) == {""}

    # a run trained before the estimate existed: `clopdit assay-capture` adds it, equal to the stage's
    old = str(tmp_path / "run")
    shutil.copytree(pca_run, old)
    stats_path = os.path.join(old, "dit", "latent_stats.json")
    stats = json.load(open(stats_path))
    written = stats.pop("assay_capture")
    json.dump(stats, open(stats_path, "w"))
    with pytest.warns(PromptWarning, match="has no capture estimate"):
        CellGenerator.from_run(old).generate([f"{base}; assay: {other}"], n=4, seed=0)
    with pytest.raises(RunDirError, match="was made from shards"):
        add_to_run(old, _other_shards(shards_dir, tmp_path))
    assert add_to_run(old, shards_dir) == written


def _other_shards(shards_dir: str, tmp_path) -> str:
    """A copy of the shards whose manifest differs by one byte: not the run's."""
    out = str(tmp_path / "other_shards")
    shutil.copytree(shards_dir, out)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text + " ")
    return out
