"""``clopdit evaluate`` on a small trained run: every generator and metric lands in
metrics.json, the report and its plots are written; the prompt tiers are frozen and held out."""

import json
import os

import numpy as np

from clopdit_dist.data.captions import CaptionBuilder, caption_corpus
from clopdit_dist.data.conditions import condition_key
from clopdit_dist.evaluate.evaluator import EvalConfig, Evaluation, HeldoutSet, evaluate_run, read_cells
from clopdit_dist.evaluate.prompts import heldout_sentences, tier_prompt
from clopdit_dist.generate import CellGenerator

META = {"cell_type": "CD8-positive, alpha-beta T cell", "tissue_general": "lung", "disease": "lung adenocarcinoma"}


def test_prompt_tiers_are_deterministic_marker_free_and_unseen_in_training():
    for tier in ("canonical", "reworded", "freeform", "type_only", "tissue_only"):
        assert tier_prompt(META, tier) == tier_prompt(dict(META), tier)
        assert "markers" not in tier_prompt(META, tier) and "CD8A" not in tier_prompt(META, tier)
    assert tier_prompt(META, "canonical") == ("cell type: CD8-positive, alpha-beta T cell; tissue: lung; "
                                              "disease: lung adenocarcinoma")
    assert "CD8-positive, alpha-beta T cell" not in tier_prompt(META, "reworded")
    assert tier_prompt({**META, "assay": "10x 5' v2"}, "assay") == tier_prompt(META, "canonical") + "; assay: 10x 5' v2"
    # the fixed words of every free-form sentence occur in no training caption, and no training
    # template is contained in a sentence
    rng = np.random.default_rng(0)
    builder = CaptionBuilder({"CD8-positive, alpha-beta T cell": ["CD8A", "GZMK"]})
    train = " ".join(builder.augment(dict(META), rng) for _ in range(2000)).lower() + " ".join(caption_corpus()).lower()
    for sentences in heldout_sentences().values():
        for s in sentences:
            fixed = [frag.strip(" ,.?:'s").lower() for frag in s.replace("}", "{").split("{")[::2]]
            longest = max(fixed, key=len)
            assert len(longest) > 8 and longest not in train, s


def test_evaluate_writes_every_generator_metric_and_plot(pca_run, shards_dir, tmp_path):
    out = str(tmp_path / "eval")
    cfg = EvalConfig(seeds=2, min_cells=12, max_cells=24, max_conditions=3, train_cells=3000,
                     guidance_grid=(0.0, 2.0), tiers=("canonical", "reworded", "assay"), augmentation_types=2,
                     compare=(f"again={pca_run}",))
    result = evaluate_run(pca_run, shards_dir, out, cfg, progress=False)
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["guidance_sweep"]["chosen"] in (0.0, 2.0) and set(saved["guidance_sweep"]["grid"]) == {"0.0", "2.0"}
    studies = saved["sets"]["studies"]
    assert studies["cells"] > 0 and 1 <= len(studies["conditions"]) <= 3
    gens = studies["generators"]
    assert {"real_half", "codec_roundtrip", "training_copies", "gaussian", "type_mean_nb", "unconditional",
            "model_canonical", "model_reworded", "model_assay", "model_again"} <= set(gens)
    # each condition names the assay of its real cells, which the "assay" tier's prompt carries
    real = read_cells(shards_dir, "test", CellGenerator.from_run(pca_run).codec.genes, 20_000)
    for c in studies["conditions"]:
        assays = list(real.meta["assay"][real.keys == condition_key(c)])
        assert c["assay"] in assays and assays.count(c["assay"]) >= len(assays) / 2
    assert gens["model_assay"]["macro"]["energy"]["n"] == 1
    # a compared run goes through the same code: the same run compared with itself scores the same
    assert gens["model_again"]["macro"]["energy"]["mean"] == gens["model_canonical"]["macro"]["energy"]["mean"]
    for g, res in gens.items():
        for key in ("identity_cell_type", "identity_tissue_general", "identity_disease", "coverage", "mmd", "mmd_u",
                    "energy", "energy_u", "w2", "auc", "diversity"):
            assert key in res["macro"], (g, key)
    # the unbiased forms leave the self-pairs out: below the V forms, which count them as zero distances
    assert gens["real_half"]["macro"]["energy_u"]["mean"] < gens["real_half"]["macro"]["energy"]["mean"]
    canon = gens["model_canonical"]["macro"]
    assert canon["energy"]["n"] == 2 and np.isfinite(canon["energy"]["lo"])  # two seeds, an interval
    assert gens["model_reworded"]["macro"]["energy"]["n"] == 1  # non-canonical tiers: tier_seeds=1
    assert "diversity_means" in canon
    # nearest-training-cell distance ratio beside every baseline; copies are the training cells
    for g in ("model_canonical", "real_half", "gaussian", "type_mean_nb", "codec_roundtrip"):
        assert gens[g]["macro"]["memorisation_ratio"]["mean"] > 0, g
    assert gens["training_copies"]["macro"]["memorisation_ratio"]["mean"] < 1e-4  # float32 embedding
    # decoded means of real cells' own latents: the ceiling of the model's diversity_means
    assert 0 < gens["codec_roundtrip"]["macro"]["diversity_means"]["mean"] < 2
    # the real half is the ceiling: it identifies its own cell type better than the null model
    assert gens["real_half"]["macro"]["identity_cell_type"]["mean"] >= gens["unconditional"]["macro"][
        "identity_cell_type"]["mean"]
    assert result["field_subset"]["per_tissue"] and result["augmentation"]["rare_types"]
    report = open(os.path.join(out, "report.md")).read()
    assert "half vs half (ceiling)" in report and "Tissue-only prompts" in report
    for png in ("guidance_sweep.png", "umap.png", "per_condition_energy.png", "marker_dotplot.png"):
        assert os.path.getsize(os.path.join(out, png)) > 5000, png
        assert f"]({png})" in report


def test_the_null_model_is_null_on_the_whole_path_whatever_the_guidance_interval(pca_run, shards_dir):
    """At guidance 0 with guidance on t in [0, 0.35] only, the model's own cells get the prompt's condition
    from t = 0.35 on; the ``unconditional`` reference must run the null branch on the whole path."""
    cfg = EvalConfig(seeds=1, min_cells=12, max_cells=16, max_conditions=1, train_cells=2000, tiers=("canonical",),
                     interval=(0.0, 0.35), report=False)
    ev = Evaluation(CellGenerator.from_run(pca_run), shards_dir, cfg, progress=False)
    hs = HeldoutSet("test", read_cells(shards_dir, "test", ev.genes, 2000), ev.train, ev.train_keys, cfg)
    samplers, generate = [], ev.gen.generate

    def recording_generate(prompts, **kw):
        samplers.append(kw["sampler"])
        return generate(prompts, **kw)

    ev.gen.generate = recording_generate
    res = ev.run_set(hs, 0.0, 1, ("canonical",))
    assert {"unconditional", "model_canonical"} <= set(res)
    assert [(s.guidance, tuple(s.interval)) for s in samplers] == [(0.0, (0.0, 0.35)), (0.0, (0.0, 1.0))]
