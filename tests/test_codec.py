"""The latent codec contract: both codecs satisfy it, and a run on the PCA codec trains
CLOP and the DiT and generates, with no code change (``codec.name=pca``)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from clopdit_dist.data.conditions import vocab_file
from clopdit_dist.data.loader import CellLoader, LoaderConfig
from clopdit_dist.errors import PromptWarning
from clopdit_dist.models.autoencoder import AEConfig, CountAutoencoder, nb_sample, nb_theta_by_moments
from clopdit_dist.models.codec import AutoencoderCodec, LatentCodec, PCACodec
from clopdit_dist.evaluate.reconstruction import pearson

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def train_batch(shards_dir):
    loader = CellLoader(shards_dir, LoaderConfig(split="train", genes="hvg:200", batch_size=2000, num_workers=0,
                                                 resampled=False), rank=0, world_size=1)
    return next(iter(loader)), loader.gene_ids


@pytest.fixture(scope="module")
def train_cells(train_batch):
    batch, genes = train_batch
    return batch["counts"], genes


def test_the_autoencoders_type_and_disease_heads_keep_labels_apart_in_z(train_batch):
    """``type_loss`` / ``disease_loss``: linear heads on z learn the cell types and diseases with the
    NB loss; cells without a label (-1) add nothing to a head's cross-entropy, and the loss is the NB
    loss plus the weighted terms."""
    batch, _ = train_batch
    names, diseases = sorted(set(batch["cell_type"])), sorted(set(batch["disease"]))
    labels = torch.tensor([names.index(t) for t in batch["cell_type"]])
    sick = torch.tensor([diseases.index(d) for d in batch["disease"]])
    counts = batch["counts"]
    torch.manual_seed(0)
    model = CountAutoencoder(AEConfig(n_genes=counts.shape[1], latent_tokens=4, token_dim=8, hidden=(128,),
                                      type_loss=50.0, n_types=len(names), disease_loss=20.0,
                                      n_diseases=len(diseases)))
    with torch.no_grad():
        first = model(counts[:256], cell_type=labels[:256], disease=sick[:256])["disease_ce"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(200):
        rows = torch.randint(0, len(counts), (256,))
        out = model(counts[rows], cell_type=labels[rows], disease=sick[rows])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(counts[:256], cell_type=labels[:256], disease=sick[:256])
        torch.testing.assert_close(out["loss"], out["nll"] + 50.0 * out["type_ce"] + 20.0 * out["disease_ce"])
        unlabelled = model(counts[:256], cell_type=torch.full((256,), -1), disease=torch.full((256,), -1))
        assert float(unlabelled["type_ce"]) == float(unlabelled["disease_ce"]) == 0.0
        assert torch.equal(unlabelled["loss"], unlabelled["nll"])
        accuracy = (model.type_head(model.encode(counts)).argmax(-1) == labels).float().mean()
    assert len(names) >= 10 and accuracy > 0.9
    assert len(diseases) >= 3 and float(out["disease_ce"]) < 0.8 * float(first)
    # a model without the heads has no such parameters, so older runs' weights still load
    plain = CountAutoencoder(AEConfig(n_genes=counts.shape[1], n_types=len(names), n_diseases=len(diseases)))
    assert plain.type_head is None and plain.disease_head is None


def _check_contract(codec, counts):
    assert isinstance(codec, LatentCodec)
    assert len(codec.genes) == counts.shape[1] and codec.latent_dim % codec.token_dim == 0
    z = codec.encode(counts)
    assert z.shape == (counts.shape[0], codec.latent_dim) and torch.isfinite(z).all()
    lib = counts.sum(-1)
    params = codec.decode(z, lib)
    assert params["mu"].shape == counts.shape and (params["mu"] >= 0).all() and (params["theta"] > 0).all()
    assert torch.allclose(params["mu"].sum(-1), lib.float(), rtol=1e-3)  # decoded means keep the library size
    x = codec.sample(z, lib, generator=torch.Generator().manual_seed(0))
    assert x.shape == counts.shape and (x >= 0).all() and torch.equal(x, x.round())
    return params["mu"]


def test_pca_codec_satisfies_the_contract_and_reconstructs_training_cells(train_cells):
    counts, genes = train_cells
    codec = PCACodec.fit(counts.numpy(), genes, n_components=32)
    mu = _check_contract(codec, counts)
    assert pearson(counts.mean(0).numpy(), mu.mean(0).numpy()) > 0.99
    # a 32-component projection keeps most of each cell's log profile; a type-free mean would not
    cell_r = [pearson(np.log1p(a), np.log1p(b)) for a, b in zip(counts.numpy()[:200], mu.numpy()[:200])]
    mean_r = [pearson(np.log1p(a), np.log1p(counts.numpy().mean(0))) for a in counts.numpy()[:200]]
    assert np.mean(cell_r) > np.mean(mean_r) + 0.05
    # NB dispersion fitted on residuals: sampled counts have the real per-gene variance, roughly
    x = codec.sample(codec.encode(counts), counts.sum(-1), generator=torch.Generator().manual_seed(1))
    ratio = (x.var(0) + 1e-3) / (counts.float().var(0) + 1e-3)
    assert 0.5 < float(ratio.median()) < 2.0


@pytest.mark.parametrize("decoder,latent_noise", [("mlp", 0.0), ("mlp+linear", 0.3), ("linear", 0.0)])
def test_autoencoder_codec_satisfies_the_contract_and_decodes_near_the_input(train_cells, decoder, latent_noise):
    counts, genes = train_cells
    torch.manual_seed(0)
    model = CountAutoencoder(AEConfig(n_genes=counts.shape[1], latent_tokens=4, token_dim=8, hidden=(128,),
                                      decoder=decoder, latent_noise=latent_noise))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(200):
        batch = counts[torch.randint(0, len(counts), (256,))]
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    codec = AutoencoderCodec(model.eval(), genes)
    assert codec.latent_dim == 32 and codec.token_dim == 8
    with torch.no_grad():
        mu = _check_contract(codec, counts)
    assert pearson(counts.mean(0).numpy(), mu.mean(0).numpy()) > 0.95
    # latent noise is a training-time augmentation only: decoding in eval mode is deterministic
    assert torch.equal(codec.decode(codec.encode(counts[:8]), counts[:8].sum(-1))["mu"],
                       codec.decode(codec.encode(counts[:8]), counts[:8].sum(-1))["mu"])


def test_a_run_on_the_pca_codec_trains_clop_and_the_dit_and_generates(pca_run, shards_dir, tmp_path):
    from clopdit_dist.generate import CellGenerator
    from clopdit_dist.models.codec import load_codec
    from clopdit_dist.run import RunDir

    run = pca_run
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    codec = load_codec(RunDir(run))
    assert codec.name == "pca" and codec.latent_dim == 16 and not os.path.exists(os.path.join(run, "ae"))
    gen = CellGenerator.from_run(run)
    adata = gen.generate(["cell type: B cell; tissue: blood"], n=8, seed=0)
    assert adata.shape == (8, 200) and list(adata.var["feature_id"]) == codec.genes
    x = adata.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum() > 0
    # field mode: "B cell" names a parent type, so the cells are its children in blood
    assert set(adata.obs["cell_type"]) <= {"naive B cell", "memory B cell"}
    assert set(adata.obs["tissue_general"]) == {"blood"}
    # a tissue alone: cell types drawn from that tissue's training composition, library sizes from those cells
    lung = gen.generate(["lung"], n=60, seed=0)
    lung_types = {c[0] for c in gen._train_conditions if c[1] == "lung"}
    assert set(lung.obs["tissue_general"]) == {"lung"} and set(lung.obs["cell_type"]) <= lung_types
    assert lung.obs["cell_type"].nunique() > 3 and (lung.obs["matched_tissue_general"] == "lung").all()
    # a mixture in stated shares (session 33): the types in those shares, not their training proportions
    a, b = "classical monocyte", "natural killer cell"  # both in blood on the test atlas; named as the tiny tower reads
    plan = gen.plan("80% classical monocytes and 20% NK cells from blood", 1000, np.random.default_rng(0))
    made = {t: sum(m for c, m in plan if c["cell_type"] == t) for t in (a, b)}
    assert sum(made.values()) == 1000 and 740 <= made[a] <= 860, made
    assert {c["tissue_general"] for c, _ in plan} == {"blood"}

    # a tissue the model was not trained on is left out, with one warning line; nothing it knows: refused
    with pytest.warns(PromptWarning, match="tissue 'kidney' is a Census tissue this model was not trained on"):
        kidney = gen.generate(["cell type: B cell; tissue: kidney"], n=8, seed=0)
    assert set(kidney.obs["cell_type"]) <= {"naive B cell", "memory B cell"} and "kidney" not in set(kidney.obs["tissue_general"])
    with pytest.warns(PromptWarning, match="trained on Homo sapiens cells only"):  # the test atlas is human
        gen.generate(["mouse B cells"], n=2, seed=0)
    # a name narrower than the model's label is generated as that label, and said so
    label, name = next((label, names[0]) for label, names in vocab_file("narrower")["cell_type"].items()
                       if label in gen.resolver.vocab["cell_type"])
    with pytest.warns(PromptWarning, match=f"cell type '{name}' is generated as '{label}'"):
        narrowed = gen.generate([name], n=4, seed=0)
    assert set(narrowed.obs["cell_type"]) == {label}
    # a part of a tissue is that tissue, said so
    with pytest.warns(PromptWarning, match="tissue 'alveoli' is generated as 'lung', the tissue it is part of"):
        alveoli = gen.generate(["cells from the alveoli"], n=4, seed=0)
    assert set(alveoli.obs["tissue_general"]) == {"lung"}
    # marker genes and no cell type: the types whose decoded training means express them most, said so. Each
    # type's own first two atlas markers name it (the codec keeps 200 genes: the types with two of them)
    from clopdit_dist.data import biology

    vocab, genes = gen.resolver.vocab["cell_type"], set(gen.var["feature_name"])
    own = {c.name: [m for m in c.markers if m in genes][:2] for c in biology.LEAF_TYPES if c.name in vocab}
    found = {t: gen.resolver.markers.cell_types("markers: " + ", ".join(ms), vocab) for t, ms in own.items()
             if len(ms) == 2}
    assert len(found) >= 5 and np.mean([r is not None and t in r[0] for t, r in found.items()]) >= 0.8, found
    prompts = {t: f"{own[t][0]}+ {own[t][1]}+ cells" for t, r in found.items() if r is not None and r[0] == [t]}
    t = next(t for t, p in prompts.items() if gen.resolver.resolve(p).markers)  # not named in words ("CD4+")
    with pytest.warns(PromptWarning, match=r"by its markers \(" + own[t][0]):
        by_markers = gen.generate([prompts[t]], n=4, seed=0)
    assert set(by_markers.obs["cell_type"]) == {t}
    # a group with one child excluded: the others, said so
    with pytest.warns(PromptWarning, match="excludes cell type 'memory B cell'"):
        naive = gen.generate(["B cells from blood, but not memory B cells"], n=6, seed=0)
    assert set(naive.obs["cell_type"]) == {"naive B cell"}
    out = str(tmp_path / "g.h5ad")
    r = subprocess.run([sys.executable, "-m", "clopdit_dist.cli", "generate", "--run", run, "--prompt", "B cells, kidney",
                        "--n", "4", "--out", out], env=env, capture_output=True, text=True)
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert r.returncode == 0 and len(warned) == 1 and "'kidney'" in warned[0], r.stderr[-2000:]

    # user errors on this run: one line, exit code 2, no traceback
    for argv, expect in ((["generate", "--run", run, "--prompt", "  ;  ", "--out", out], "names no cells"),
                         (["generate", "--run", run, "--prompt", "kidney podocytes", "--out", out],
                          # the Cell Ontology's synonym "kidney podocyte" names the cell type, refused by its label
                          "cell type 'kidney podocytes' (podocyte) is a Census cell type this model was not trained on"),
                         (["train", "dit", "--run", run, "--shards", shards_dir, "train.stepz=3"], "train.stepz"),
                         (["train", "clop", "--run", run, "--shards", shards_dir, "codec.name=autoencoder"],
                          "already uses codec 'pca'")):
        r = subprocess.run([sys.executable, "-m", "clopdit_dist.cli", *argv], env=env, capture_output=True, text=True)
        assert r.returncode == 2, (argv, r.stderr[-2000:])
        assert expect in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
            r.stderr[-2000:]


def test_a_new_combination_is_sampled_with_compositional_guidance(pca_run):
    from dataclasses import replace

    from clopdit_dist.generate import CellGenerator

    gen = CellGenerator.from_run(pca_run)
    seen = gen._train_combinations
    types, tissues, diseases = (sorted({c[i] for c in seen}) for i in range(3))
    new = next((t, ts, d) for t in types for ts in tissues for d in diseases if (t, ts, d) not in seen)
    old = sorted(seen)[0]
    prompt = "cell type: {}; tissue: {}; disease: {}".format
    cells = gen.generate([prompt(*new), prompt(*old)], n=6, seed=3)
    assert list(cells.obs["guidance_fields"]) == ["composed"] * 6 + ["joint"] * 6
    assert tuple(cells.obs[["cell_type", "tissue_general", "disease"]].iloc[0]) == new
    # the same cells as asking for the field weights outright; different from the joint condition
    w = gen.default_sampler.guidance
    explicit = gen.generate([prompt(*new)], n=6, seed=3, sampler=replace(gen.default_sampler, field_weights=(w, w, w)))
    joint = gen.generate([prompt(*new)], n=6, seed=3, sampler=replace(gen.default_sampler, compose_unseen=False))
    np.testing.assert_array_equal(cells.X[:6].toarray(), explicit.X.toarray())
    assert (explicit.obs["guidance_fields"] == "composed").all()
    assert not np.array_equal(cells.obsm["X_latent"][:6], joint.obsm["X_latent"])
    assert (joint.obs["guidance_fields"] == "joint").all()


def test_a_prompt_gives_the_same_cells_alone_beside_others_and_in_any_batching(pca_run):
    """Starting noise, SDE step noise (flow.CellNoise), library sizes and counts all come from the
    prompt's own seed: another prompt in the call, or smaller batches, leave its cells as they were."""
    from dataclasses import replace

    from clopdit_dist.generate import CellGenerator

    gen = CellGenerator.from_run(pca_run)
    sde = replace(gen.default_sampler, method="sde", noise=1.0, steps=4)
    (t, s, d), other = sorted(gen._train_combinations)[:2]
    prompt = "cell type: {}; tissue: {}; disease: {}".format
    alone = gen.generate([prompt(t, s, d)], n=9, seed=5, sampler=sde)
    beside = gen.generate([prompt(t, s, d), prompt(*other)], n=[9, 7], seed=5, sampler=sde, batch_size=4)
    np.testing.assert_allclose(beside.obsm["X_latent"][:9], alone.obsm["X_latent"], rtol=1e-4, atol=1e-5)
    reseeded = gen.generate([prompt(t, s, d)], n=9, seed=6, sampler=sde)
    assert not np.allclose(reseeded.obsm["X_latent"], alone.obsm["X_latent"], atol=1e-3)


def test_a_new_disease_combination_is_its_healthy_combination_shifted_by_the_disease(pca_run, shards_dir):
    """disease_shift: a new (type, tissue, disease) is sampled as (type, tissue, normal) and moved
    by the disease's mean effect on that type in the tissues training has it in, in the latent
    or in the decoded log-proportions."""
    import json
    import os
    from dataclasses import replace

    import torch

    from clopdit_dist.data.conditions import CONDITION_FIELDS
    from clopdit_dist.generate import CellGenerator

    gen = CellGenerator.from_run(pca_run)
    seen = gen._train_combinations
    candidates = [(t, s, d) for (t, s2, d) in seen for s in {c[1] for c in seen}
                  if d != "normal" and (t, s, d) not in seen and (t, s, "normal") in seen and (t, s2, "normal") in seen]
    assert candidates, "the test atlas has no new disease combination with a healthy counterpart"
    t, s, d = new = sorted(candidates)[0]
    prompt = "cell type: {}; tissue: {}; disease: {}".format
    on = replace(gen.default_sampler, disease_shift=True)
    cells = gen.generate([prompt(*new)], n=6, seed=3, sampler=on)
    healthy = gen.generate([prompt(t, s, "normal")], n=6, seed=3, sampler=on)
    assert (cells.obs["guidance_fields"] == "disease_shift").all() and (healthy.obs["guidance_fields"] == "joint").all()
    assert tuple(cells.obs[list(CONDITION_FIELDS)].iloc[0]) == new

    # the shift, from the training cells the DiT stage took its statistics from (the first batch of
    # 1,024 at the fixture's stats_cells=500): mean latent with the disease minus without it, per
    # tissue where those cells have both, weighted by the smaller of the two cell counts
    batch = next(iter(CellLoader(shards_dir, LoaderConfig(split="train", genes=gen.codec.genes, batch_size=1024,
                                                          num_workers=0, resampled=False, fields=CONDITION_FIELDS),
                                 rank=0, world_size=1)))
    z = gen.codec.encode(batch["counts"]).numpy()
    meta = {f: np.asarray(batch[f]) for f in CONDITION_FIELDS}
    sick_means, well_means, weights = [], [], []
    for tissue in sorted(set(meta["tissue_general"])):
        sick = (meta["cell_type"] == t) & (meta["tissue_general"] == tissue) & (meta["disease"] == d)
        well = (meta["cell_type"] == t) & (meta["tissue_general"] == tissue) & (meta["disease"] == "normal")
        if sick.any() and well.any():
            sick_means.append(z[sick].mean(0))
            well_means.append(z[well].mean(0))
            weights.append(min(sick.sum(), well.sum()))
    shift = np.average(np.subtract(sick_means, well_means), axis=0, weights=weights)
    np.testing.assert_allclose(cells.obsm["X_latent"] - healthy.obsm["X_latent"], np.broadcast_to(shift, (6, len(shift))),
                               atol=1e-3)
    assert np.abs(shift).max() > 1e-2

    # in expression space: the same healthy latents; the same pairs' difference of decoded
    # log-proportions (of the mean latents) added before the draw, so the genes it raises most
    # take a larger share of the counts than in the healthy cells of the same latents
    log_p = [gen.codec.decode(torch.from_numpy(np.stack(means)).float(), torch.ones(len(means)))["mu"].clamp_min(1e-12).log()
             for means in (sick_means, well_means)]
    expected = np.average((log_p[0] - log_p[1]).numpy(), axis=0, weights=weights)
    expr = replace(gen.default_sampler, disease_shift="expression")
    healthy_condition, log_shift = gen.disease_shift(dict(zip(CONDITION_FIELDS, new)), expr)
    assert tuple(healthy_condition.values()) == (t, s, "normal")
    np.testing.assert_allclose(log_shift.numpy(), expected, atol=1e-4)
    sick_cells = gen.generate([prompt(*new)], n=400, seed=3, sampler=expr)
    well_cells = gen.generate([prompt(t, s, "normal")], n=400, seed=3, sampler=expr)
    assert (sick_cells.obs["guidance_fields"] == "disease_shift").all()
    np.testing.assert_allclose(sick_cells.obsm["X_latent"], well_cells.obsm["X_latent"], atol=1e-5)
    up = np.argsort(-expected)[:20]
    assert sick_cells.X[:, up].sum() / sick_cells.X.sum() > 1.2 * well_cells.X[:, up].sum() / well_cells.X.sum()

    # off by default, and never for a seen or a partial combination
    assert (gen.generate([prompt(*new)], n=2, seed=3).obs["guidance_fields"] == "composed").all()
    assert gen.disease_shift({"cell_type": t, "tissue_general": s, "disease": "normal"}, on) is None
    assert gen.disease_shift({"cell_type": t, "tissue_general": None, "disease": d}, on) is None
    # a run whose statistics predate the per-group latent means falls back to compositional guidance
    with open(os.path.join(pca_run, "dit", "latent_stats.json")) as f:
        groups = json.load(f)["library"]["groups"]
    assert all("z_mean" in g for g in groups)
    gen._latent_means = {}
    assert (gen.generate([prompt(*new)], n=2, seed=3, sampler=on).obs["guidance_fields"] == "composed").all()


def test_decoder_dropout_zero_keeps_the_decoder_deterministic_and_its_dispersion_higher(train_batch):
    """``decoder_dropout=0``: in training the decoder's means are the ones sampling will use (the
    encoder keeps its dropout), so the per-gene inverse dispersion it learns is not lowered to absorb
    dropout noise in the means, as it is with dropout in the decoder (``decoder_dropout=None``, the default)."""
    batch, _ = train_batch
    counts = batch["counts"]

    def trained(decoder_dropout):
        torch.manual_seed(0)
        model = CountAutoencoder(AEConfig(n_genes=counts.shape[1], latent_tokens=4, token_dim=8, hidden=(128,),
                                          dropout=0.3, decoder_dropout=decoder_dropout))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            out = model(counts[torch.randint(0, len(counts), (256,))])
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        return model

    plain, dropped = trained(0.0), trained(None)
    z, lib = torch.randn(8, 32), torch.full((8,), 2000.0)
    with torch.no_grad():  # train mode: only the encoder draws dropout masks
        assert torch.equal(plain.decode(z, lib)["mu"], plain.decode(z, lib)["mu"])
        assert not torch.equal(plain.encode(counts[:8]), plain.encode(counts[:8]))
        assert not torch.equal(dropped.decode(z, lib)["mu"], dropped.decode(z, lib)["mu"])
    assert plain.log_theta.median() > dropped.log_theta.median() + 0.1


def test_nb_theta_by_moments_recovers_the_inverse_dispersion_of_nb_draws():
    """The estimator the autoencoder's ``dispersion=moments`` and the PCA codec use, on counts drawn
    with known means and inverse dispersions."""
    g = torch.Generator().manual_seed(0)
    genes = 40
    mu = torch.linspace(2.0, 20.0, genes).expand(20_000, genes)
    theta = torch.linspace(0.5, 5.0, genes)
    x = nb_sample(mu, theta.expand_as(mu), g)
    est = nb_theta_by_moments(x, mu)
    assert ((est - theta).abs() / theta).max() < 0.1
    poisson = torch.poisson(mu, generator=g)  # no excess variance: clipped to the upper bound
    assert nb_theta_by_moments(poisson, mu).median() > 50


def test_thinned_moments_compare_one_half_of_each_cell_with_the_mean_decoded_from_the_other(shards_dir):
    """``dispersion=thinned``: binomial thinning keeps an NB's inverse dispersion (x2 ~ NB(mu / 2, theta)), and
    the ae stage compares each cell's half x2 with the mean the autoencoder decodes from the other half."""
    from clopdit_dist.data.loader import iter_split
    from clopdit_dist.stages.ae import AEStage, AEStageConfig
    from clopdit_dist.train.config import DataConfig

    g = torch.Generator().manual_seed(0)
    mu = torch.linspace(2.0, 20.0, 40).expand(20_000, 40)
    theta = torch.linspace(0.5, 5.0, 40)
    x = nb_sample(mu, theta.expand_as(mu), g)
    x2 = x - torch.binomial(x, torch.full_like(x, 0.5), generator=g)
    assert ((nb_theta_by_moments(x2, mu / 2) - theta).abs() / theta).max() < 0.12

    stage = AEStage(AEStageConfig(model=AEConfig(n_genes=200, latent_tokens=2, token_dim=8, hidden=(32,)),
                                  data=DataConfig(shards=shards_dir, genes="hvg:200"), dispersion="thinned"))
    model = stage.build_model().eval()
    counts = torch.cat([b["counts"] for b in iter_split(shards_dir, "train", "hvg:200", 300, batch_size=2048)])
    with torch.no_grad():
        (half, params), = list(stage._round_trips(model, "train", 300, batch_size=2048,
                                                  thin=torch.Generator().manual_seed(1)))
        other = counts - half
        assert (half >= 0).all() and (other >= 0).all() and 0.45 < half.sum() / counts.sum() < 0.55
        torch.testing.assert_close(params["mu"], model.decode(model.encode(other), half.sum(-1))["mu"])
        state = model.state_dict()
        thinned, own = stage.moment_dispersion(state, thinned=True), stage.moment_dispersion(state)
    assert thinned.shape == (200,) and torch.isfinite(thinned).all() and not torch.equal(thinned, own)
