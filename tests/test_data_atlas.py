"""The synthetic Census-shaped atlas and the ingest of real h5ad files, on real TileDB-SOMA."""

import os

import anndata as ad
import cellxgene_census
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from clopdit_dist.data import biology as bio
from clopdit_dist.data.census_layout import OBS_SCHEMA
from clopdit_dist.data.ingest import ingest_h5ad
from clopdit_dist.data.source import CellSource, Query
from clopdit_dist.data.synthetic import SynthConfig, SyntheticAtlas, write_synthetic_atlas

from conftest import ATLAS_CFG


def read_all(uri):
    with cellxgene_census.open_soma(uri=uri) as census:
        exp = census["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
        X = sp.csr_matrix((t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())),
                          shape=(len(obs), len(var)))
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
    return obs, var, X, datasets


def test_open_soma_opens_the_atlas_with_census_schema(atlas_dir):
    obs, var, X, datasets = read_all(atlas_dir)
    assert list(obs.columns) == OBS_SCHEMA.names
    assert {"feature_id", "feature_name"} <= set(var.columns)
    assert len(obs) == ATLAS_CFG.n_cells and len(var) == ATLAS_CFG.n_genes
    assert np.all(np.mod(X.data, 1) == 0) and X.data.min() > 0
    assert obs["dataset_id"].nunique() == ATLAS_CFG.n_studies >= 10
    assert set(datasets["dataset_id"]) == set(obs["dataset_id"])
    assert obs["tissue_general"].nunique() == 6
    assert obs["cell_type"].nunique() >= 25
    assert obs["assay"].nunique() == 2
    assert obs["disease"].nunique() >= 3
    assert obs.groupby("dataset_id")["donor_id"].nunique().min() >= 3
    # raw_sum is the Census QC column and must equal the stored counts
    np.testing.assert_allclose(obs["raw_sum"].to_numpy(), np.asarray(X.sum(axis=1)).ravel())
    # real marker symbols are in the vocabulary
    assert {"CD3E", "CD8A", "MS4A1", "LYZ", "EPCAM", "ALB"} <= set(var["feature_name"])


def test_atlas_biology_is_worth_evaluating_on():
    atlas = SyntheticAtlas(SynthConfig(n_cells=40_000, n_genes=600, seed=3))
    obs, X = atlas.sample(0, 6000)
    names = atlas.var["feature_name"].to_numpy()
    lib = np.asarray(X.sum(axis=1)).ravel()
    assert lib.std() / lib.mean() > 0.4  # a spread of library sizes
    # markers: CD8A high in CD8 T cells, absent-ish elsewhere
    cd8 = (obs["cell_type"] == "CD8-positive, alpha-beta T cell").to_numpy()
    j = int(np.flatnonzero(names == "CD8A")[0])
    cp = X.multiply(1e4 / lib[:, None]).tocsc()
    assert cp[cd8, j].mean() > 20 * cp[~cd8, j].mean()
    # children share the parent's program: CD3E is high in CD4, CD8 and Treg alike
    k = int(np.flatnonzero(names == "CD3E")[0])
    for t in ("CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "regulatory T cell"):
        sel = (obs["cell_type"] == t).to_numpy()
        assert cp[sel, k].mean() > 10 * cp[~obs["cell_type"].str.contains("T cell").to_numpy(), k].mean()
    # overdispersion: within one type and study, a housekeeping gene's variance exceeds its mean
    g = int(np.flatnonzero(names == "ACTB")[0])
    first = obs["dataset_id"].iloc[0]
    sel = ((obs["dataset_id"] == first) & (obs["cell_type"] == obs["cell_type"].iloc[0])).to_numpy()
    x = X[sel, g].toarray().ravel()
    assert x.var() > 1.5 * x.mean()
    # cells of a type are not clones: cell-cycle genes switch on in a minority only
    cc = [int(np.flatnonzero(names == s)[0]) for s in bio.CELL_CYCLE_G2M]
    g2m = np.asarray(cp[:, cc].sum(axis=1)).ravel()
    frac = (g2m > 5 * np.median(g2m)).mean()
    assert 0.005 < frac < 0.2
    # rare cell types exist and are rare
    freq = obs["cell_type"].value_counts(normalize=True)
    rare = [t for t in ("plasmacytoid dendritic cell", "mast cell", "hematopoietic stem cell", "melanocyte")
            if freq.get(t, 0) < 0.005]
    assert len(rare) >= 2


def test_synthesis_is_deterministic_and_independent_of_workers(tmp_path):
    cfg = SynthConfig(n_cells=700, n_genes=400, n_studies=10, seed=11, chunk_size=256)
    write_synthetic_atlas(str(tmp_path / "a"), cfg, workers=1, progress=False)
    write_synthetic_atlas(str(tmp_path / "b"), cfg, workers=2, progress=False)
    oa, va, Xa, _ = read_all(str(tmp_path / "a"))
    ob, vb, Xb, _ = read_all(str(tmp_path / "b"))
    pd.testing.assert_frame_equal(oa, ob)
    pd.testing.assert_frame_equal(va, vb)
    assert (Xa != Xb).nnz == 0
    other = SyntheticAtlas(SynthConfig(n_cells=700, n_genes=400, n_studies=10, seed=12)).sample(0, 256)[1]
    assert (other != Xa[:256]).nnz > 0


def test_synth_refuses_a_non_empty_output(atlas_dir):
    with pytest.raises(FileExistsError, match="already holds"):
        write_synthetic_atlas(atlas_dir, ATLAS_CFG, progress=False)


@pytest.fixture(scope="module")
def wu2020():
    import scirpy

    path = os.path.join(os.path.dirname(scirpy.__file__), "tests", "data", "wu2020_200_v0_11.h5ad")
    return path, ad.read_h5ad(path)


def test_ingest_real_h5ad_into_new_and_existing_collections(tmp_path, wu2020, atlas_dir):
    path, adata = wu2020
    mapping = {"cell_type": "cluster_orig", "donor_id": "patient", "tissue_general": "source"}
    out = str(tmp_path / "real")
    assert ingest_h5ad(path, out, mapping=mapping) == adata.n_obs
    obs, var, X, datasets = read_all(out)
    assert list(obs["cell_type"]) == list(adata.obs["cluster_orig"].astype(str))
    assert list(obs["donor_id"]) == list(adata.obs["patient"].astype(str))
    assert (obs["assay"] == "unknown").all()
    assert list(var["feature_name"]) == list(adata.var_names)
    assert (X != sp.csr_matrix(adata.X)).nnz == 0
    assert len(datasets) == 1

    # append the real cells to (a copy of) the synthetic atlas, matching genes by symbol
    import shutil

    merged = str(tmp_path / "merged")
    shutil.copytree(atlas_dir, merged)
    n_before = ATLAS_CFG.n_cells
    ingest_h5ad(path, merged, mapping=mapping, match_by="feature_name")
    obs, var, X, datasets = read_all(merged)
    assert len(obs) == n_before + adata.n_obs
    assert obs["soma_joinid"].tolist() == list(range(len(obs)))
    # shared symbols kept their synthetic feature_id; the others were added
    cd8a = var.loc[var["feature_name"] == "CD8A", "feature_id"].tolist()
    assert len(cd8a) == 1 and cd8a[0].startswith("SYN")
    assert len(var) == len(set(var["feature_name"]) | set(adata.var_names))
    j = int(var.index[var["feature_name"] == "CD8A"][0])
    np.testing.assert_array_equal(X[n_before:, j].toarray().ravel(),
                                  adata[:, "CD8A"].X.toarray().ravel())
    # and a query over the merged collection reads them back
    with CellSource(Query(merged, obs_filter="tissue_general == 'Lung'")) as src:
        sel = src.obs()
    assert len(sel) == int((adata.obs["source"] == "Lung").sum())


def test_ingest_refuses_non_integer_counts(tmp_path, wu2020):
    _, adata = wu2020
    norm = adata.copy()
    norm.X = sp.csr_matrix(np.log1p(norm.X.toarray() / 7.0))
    bad = str(tmp_path / "normalised.h5ad")
    norm.write_h5ad(bad)
    with pytest.raises(ValueError, match="non-integer.*not raw counts.*--layer"):
        ingest_h5ad(bad, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    # the same file with a counts layer is accepted
    norm.layers["counts"] = adata.X
    good = str(tmp_path / "with_counts.h5ad")
    norm.write_h5ad(good)
    assert ingest_h5ad(good, str(tmp_path / "out2"), mapping={"cell_type": "cluster_orig"}) == adata.n_obs
    with pytest.raises(KeyError, match="does not have"):
        ingest_h5ad(good, str(tmp_path / "out3"), mapping={"cell_type": "no_such_column"})


@pytest.mark.parametrize("seed", [0, 1, 2, ATLAS_CFG.seed])
def test_studies_pair_tissues_with_diseases_so_held_out_combinations_are_new(seed):
    atlas = SyntheticAtlas(SynthConfig(n_cells=20_000, n_genes=400, seed=seed))
    pairs = [(s.tissues[0], d) for s in atlas.studies for d in s.diseases]
    assert len(pairs) == len(atlas.studies) == len(set(pairs))  # each study has a (tissue, disease) of its own
    for d in bio.DISEASES[1:]:
        assert all(t in bio.TISSUE_BY_NAME for t in d.tissues)
    # most diseases occur in two tissues, and every tissue has two, so a held-out study can bring
    # a disease that training saw in another tissue only
    assert sum(len(d.tissues) >= 2 for d in bio.DISEASES[1:]) >= len(bio.DISEASES) - 2
    assert all(sum(t.name in d.tissues for d in bio.DISEASES) >= 2 for t in bio.TISSUES)


def test_sub_states_are_discrete_and_visible_in_the_counts():
    atlas = SyntheticAtlas(SynthConfig(n_cells=40_000, n_genes=600, seed=3))
    obs, X = atlas.sample(0, 6000)
    names = atlas.var["feature_name"].to_numpy()
    lib = np.asarray(X.sum(axis=1)).ravel()
    logcp = np.log1p(X.multiply(1e4 / lib[:, None]).toarray())
    checked = 0
    for cell_type, states in bio.SUB_STATES.items():
        sel = (obs["cell_type"] == cell_type).to_numpy()
        if sel.sum() < 150:
            continue
        score = np.stack([logcp[np.ix_(sel, [int(np.flatnonzero(names == g)[0]) for g in s.genes])].mean(1)
                          for s in states], 1)
        share = np.bincount(score.argmax(1), minlength=len(states)) / sel.sum()
        # the module a cell expresses most is (mostly) its state: shares follow the state weights
        np.testing.assert_allclose(share, [s.weight for s in states], atol=0.12)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("buffer_bytes", [None, 2048])
def test_obs_reads_labels_as_categories_with_the_same_values(atlas_dir, buffer_bytes, monkeypatch):
    """The shard planner holds every cell's labels: categorical codes, not pointers to Python strings.
    With a small read buffer the labels come in many batches (each its own categories); joined,
    they are the same."""
    import clopdit_dist.data.source as source

    batches = []
    monkeypatch.setattr(source, "_categorical_frame", lambda t, f=source._categorical_frame: batches.append(f(t)) or
                        batches[-1])
    if buffer_bytes:
        monkeypatch.setattr(source, "OBS_READ_BUFFER_BYTES", buffer_bytes)
    cols = ["soma_joinid", "dataset_id", "cell_type", "disease"]
    flt = "tissue_general == 'lung'"
    with CellSource(Query(atlas_dir, obs_filter=flt)) as src:
        obs = src.obs(cols)
        plain = src.exp.obs.read(value_filter=flt, column_names=cols).concat().to_pandas()
    plain = plain.sort_values("soma_joinid").reset_index(drop=True)
    labels = [c for c in plain.columns if c != "soma_joinid"]  # the filter's column comes back too
    assert len(obs) == len(plain) > 0 and all(isinstance(obs[c].dtype, pd.CategoricalDtype) for c in labels)
    pd.testing.assert_frame_equal(obs.astype({c: object for c in labels}), plain)
    assert all(obs[c].cat.codes.dtype.itemsize == 1 for c in labels)  # a byte per label, not an 8-byte pointer
    assert (len(batches) > 3) == bool(buffer_bytes)


def test_the_atlas_gives_each_cells_true_mean_beside_the_same_counts():
    atlas = SyntheticAtlas(SynthConfig(n_cells=3000, n_genes=600, seed=5))
    obs, X = atlas.sample(0, 2048)
    obs2, X2, mu = atlas.sample(0, 2048, with_means=True)
    assert (X != X2).nnz == 0 and obs.equals(obs2)  # the means cost no draw: the same cells
    assert mu.shape == X.shape and (mu > 0).all()
    # the counts were drawn around these means: NB(mu, theta) has mean mu and variance mu + mu^2 / theta
    x = X.toarray()
    resid = (x - mu) / np.sqrt(mu + mu**2 / atlas.theta)
    assert abs(resid.mean()) < 0.01 and abs(resid.var() - 1) < 0.05
    # and not around another cell's means
    shuffled = (x - mu[::-1]) / np.sqrt(mu[::-1] + mu[::-1] ** 2 / atlas.theta)
    assert shuffled.var() > 1.5
    # the study and donor part of each cell's logits: cells of one donor share it, other donors' differ
    effects = atlas.study_effects(obs)
    donor = obs["donor_id"].to_numpy()
    same = np.flatnonzero(donor == donor[0])
    assert len(same) > 1 and np.array_equal(effects[same[0]], effects[same[1]])
    assert not np.allclose(effects[np.flatnonzero(donor != donor[0])[0]], effects[0])
    assert abs(effects.std() - np.hypot(0.3, 0.15)) < 0.05  # STUDY_EFFECT_SD, DONOR_EFFECT_SD
