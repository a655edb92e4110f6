"""Shard building on real TileDB-SOMA and real tar files: coverage, splits, manifest, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from clopdit_dist.data.loader import CellLoader, LoaderConfig
from clopdit_dist.data.manifest import CELL_SPLITS, CONDITION_KEYS, SPLITS, Manifest
from clopdit_dist.data.plan import PLAN_IDS, load_plan, split_cells
from clopdit_dist.data.shards import BUILD_DIR, ShardConfig, build_shards
from clopdit_dist.data.source import CellSource, Query

from conftest import ATLAS_CFG, shard_config


def read_split(shards, split, **kw):
    loader = CellLoader(shards, LoaderConfig(split=split, genes="all", batch_size=100, num_workers=0,
                                             resampled=False, **kw))
    return list(loader)


def test_every_cell_once_and_studies_never_split(shards_dir):
    m = Manifest.load(shards_dir)
    seen, study_split = [], {}
    for split in SPLITS:
        for batch in read_split(shards_dir, split):
            seen += batch["soma_joinid"].tolist()
            for study in batch["dataset_id"]:
                # held-out cells of training studies belong to a training study
                study_level = "train" if split in CELL_SPLITS else split
                assert study_split.setdefault(study, study_level) == study_level
    assert sorted(seen) == list(range(ATLAS_CFG.n_cells))
    assert study_split == m.data["splits"]
    assert all(m.studies(s) for s in SPLITS)
    assert sum(m.n_cells(s) for s in SPLITS) == ATLAS_CFG.n_cells


def test_manifest_contents(shards_dir):
    m = Manifest.load(shards_dir)
    assert m.verify() == []
    assert m.n_genes == ATLAS_CFG.n_genes
    assert sorted(m.data["hvg"]["ranking"]) == list(range(m.n_genes))
    for key in ("mean_log1p_cp10k", "var_log1p_cp10k", "detection_rate"):
        assert len(m.data["gene_stats"][key]) == m.n_genes
    det = np.array(m.data["gene_stats"]["detection_rate"])
    assert 0 < det.mean() < 1
    markers = {t: [g["feature_name"] for g in v] for t, v in m.data["markers"].items()}
    assert "CD8A" in markers["CD8-positive, alpha-beta T cell"][:10]
    assert "MS4A1" in markers["naive B cell"][:10] or "MS4A1" in markers["memory B cell"][:10]
    assert "ALB" in markers["hepatocyte"][:10]
    groups = m.data["library_size"]["groups"]
    assert sum(g["n"] for g in groups) == m.n_cells("train")
    assert all(6 < g["mean_log"] < 11 for g in groups)
    # a HVG is more variable than a median gene
    disp = np.array(m.data["hvg"]["normalized_dispersion"])
    assert disp[m.hvg(20)].mean() > np.median(disp)


def test_batches_hold_the_counts_soma_has(shards_dir, atlas_dir):
    loader = CellLoader(shards_dir, LoaderConfig(split="train", genes="hvg:100", batch_size=64, num_workers=0))
    batch = next(iter(loader))
    with CellSource(Query(atlas_dir)) as src:
        obs, X = src.read_cells(batch["soma_joinid"].numpy())
    np.testing.assert_array_equal(batch["counts"].numpy(), X[:, loader.gene_idx].toarray())
    np.testing.assert_allclose(batch["library_size"].numpy(), np.asarray(X.sum(axis=1)).ravel())
    assert batch["cell_type"] == obs["cell_type"].tolist()
    assert loader.gene_names == [loader.manifest.feature_names[i] for i in loader.gene_idx]


def test_chunked_reads_of_scattered_cells_equal_one_read(atlas_dir, monkeypatch):
    """Held-out-cell shards read ids scattered over the whole array; read_cells reads them a
    few runs of consecutive ids at a time (memory bounded by the chunk). The result must not
    depend on the chunk."""
    import clopdit_dist.data.source as source

    ids = np.random.default_rng(0).choice(ATLAS_CFG.n_cells, 300, replace=False)
    ids = np.r_[ids, ids[:5], np.arange(40, 90)]  # repeats come back in place; a run of consecutive ids
    with CellSource(Query(atlas_dir)) as src:
        obs_one, X_one = src.read_cells(ids)
        monkeypatch.setattr(source, "READ_CHUNK_RUNS", 7)
        obs, X = src.read_cells(ids)
    assert obs["soma_joinid"].tolist() == ids.tolist()
    pd.testing.assert_frame_equal(obs, obs_one)
    assert (X != X_one).nnz == 0 and X.nnz == X_one.nnz > 0


def test_dry_run_prints_counts_and_writes_nothing(atlas_dir, tmp_path):
    lines = []
    assert build_shards(shard_config(atlas_dir, str(tmp_path / "s")), dry_run=True, log=lines.append) is None
    plan = json.loads(lines[0])
    assert plan["cells"] == ATLAS_CFG.n_cells and plan["studies"] == ATLAS_CFG.n_studies
    assert not os.path.exists(tmp_path / "s")


def test_obs_filter_selects_and_bad_filters_are_explained(atlas_dir, tmp_path):
    out = str(tmp_path / "lung")
    m = build_shards(shard_config(atlas_dir, out, obs_filter="tissue_general == 'lung' and is_primary_data == True"),
                     progress=False, log=lambda *_: None)
    cells = [t for split in SPLITS for b in read_split(out, split) for t in b["tissue_general"]]
    assert set(cells) == {"lung"} and len(cells) == sum(m["n_cells"].values())
    with pytest.raises(ValueError, match="tissue_genral.*obs columns are:.*tissue_general"):
        build_shards(shard_config(atlas_dir, str(tmp_path / "x"), obs_filter="tissue_genral == 'lung'"))
    with pytest.raises(ValueError, match="matches no cell"):
        build_shards(shard_config(atlas_dir, str(tmp_path / "y"), obs_filter="tissue_general == 'moon'"))


def test_other_settings_in_the_same_out_are_refused(atlas_dir, shards_dir):
    cfg = shard_config(atlas_dir, shards_dir)
    cfg.cells_per_block = 32
    with pytest.raises(ValueError, match="other settings.*cells_per_block"):
        build_shards(cfg, progress=False)


def test_a_plan_saved_by_an_older_version_is_still_checked(atlas_dir, shards_dir, tmp_path):
    """Builds started before the plan's ids moved to a memory-mapped .npy kept them in plan.npz;
    such a build is still recognised, so other settings are still refused."""
    import shutil

    legacy = str(tmp_path / "legacy")
    shutil.copytree(shards_dir, legacy)
    build = os.path.join(legacy, BUILD_DIR)
    new = load_plan(build)
    with open(os.path.join(build, "plan.json")) as f:
        meta = json.load(f)
    del meta["offsets"]
    with open(os.path.join(build, "plan.json"), "w") as f:
        json.dump(meta, f)
    np.savez(os.path.join(build, "plan.npz"), joinids=np.asarray(new.joinids), offsets=new.offsets)
    os.remove(os.path.join(build, PLAN_IDS))
    old = load_plan(build)
    assert (old.joinids == new.joinids).all() and (old.offsets == new.offsets).all() and old.shards == new.shards
    cfg = shard_config(atlas_dir, legacy)
    cfg.cells_per_block = 32
    with pytest.raises(ValueError, match="other settings.*cells_per_block"):
        build_shards(cfg, progress=False)


def _shard_cmd(atlas, out):
    return [sys.executable, "-m", "clopdit_dist.cli", "data", "shards", "--source", atlas, "--out", out,
            "--cells-per-block", "64", "--blocks-per-shard", "1", "--no-progress"]


def test_build_killed_with_sigkill_resumes_to_the_same_shards(atlas_dir, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(_shard_cmd(atlas_dir, ref), check=True, capture_output=True)
    proc = subprocess.Popen(_shard_cmd(atlas_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    build = os.path.join(out, BUILD_DIR)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [f for f in os.listdir(build) if f.endswith(".json") and f != "plan.json"] if os.path.isdir(build) else []
        if len(done) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "manifest.json")), "the build finished before it was killed"
    n_done = len([f for f in os.listdir(build) if f.endswith(".json") and f != "plan.json"])
    resumed = subprocess.run(_shard_cmd(atlas_dir, out), check=True, capture_output=True, text=True)
    assert f"resuming: {n_done} of" in resumed.stdout
    a, b = Manifest.load(ref), Manifest.load(out)
    assert [(s["name"], s["sha256"]) for s in a.data["shards"]] == [(s["name"], s["sha256"]) for s in b.data["shards"]]
    assert b.verify() == []
    assert not [f for f in os.listdir(out) if f.endswith(".partial")]
    ids = [i for split in SPLITS for batch in read_split(out, split)
           for i in batch["soma_joinid"].tolist()]
    assert sorted(ids) == list(range(ATLAS_CFG.n_cells))


def _cells_by_split(shards):
    """split -> DataFrame of every cell's study and condition, as the loader reads them."""
    out = {}
    for split in SPLITS:
        rows = [pd.DataFrame({k: b[k] for k in ("dataset_id", *CONDITION_KEYS)}).assign(soma_joinid=b["soma_joinid"].numpy())
                for b in read_split(shards, split)]
        out[split] = pd.concat(rows, ignore_index=True)
    return out


def test_held_out_cells_come_from_training_studies_stratified_by_condition(shards_dir):
    m = Manifest.load(shards_dir)
    cells = _cells_by_split(shards_dir)
    f = m.data["held_out_cells"]["fraction"]
    assert f == 0.03 and m.data["build"]["heldout_cell_fraction"] == f
    ids = {k: set(v["soma_joinid"]) for k, v in cells.items()}
    for a in SPLITS:  # disjoint: no cell in two splits
        for b in SPLITS:
            assert a == b or not (ids[a] & ids[b]), (a, b)
    train_studies = set(m.studies("train"))
    for split in CELL_SPLITS:
        assert len(cells[split]) == m.n_cells(split) == m.data["held_out_cells"]["n_cells"][split] > 0
        assert set(cells[split]["dataset_id"]) <= train_studies
        assert m.data["held_out_cells"]["n_cells_per_study"][split] == cells[split]["dataset_id"].value_counts().to_dict()
    # per study and condition: n * fraction held out in each, rounded down or up, and at least one
    # cell from every condition of >= 1/fraction cells
    everything = pd.concat([cells[s].assign(split=s) for s in ("train", *CELL_SPLITS)])
    table = pd.crosstab([everything[k] for k in ("dataset_id", *CONDITION_KEYS)], everything["split"])
    n = table.sum(axis=1)
    checked = 0
    for split in CELL_SPLITS:
        assert (np.abs(table[split] - n * f) < 1).all(), table[np.abs(table[split] - n * f) >= 1]
        big = n >= 1 / f
        assert (table.loc[big, split] >= 1).all()
        checked += int(big.sum())
    assert checked >= 4  # the fixture has conditions big enough to check


def test_manifest_lists_conditions_per_split_with_in_train(shards_dir):
    m = Manifest.load(shards_dir)
    cells = _cells_by_split(shards_dir)
    assert m.data["conditions"]["keys"] == list(CONDITION_KEYS)
    in_train = set(map(tuple, cells["train"][list(CONDITION_KEYS)].drop_duplicates().to_numpy()))
    for split in SPLITS:
        got = {tuple(c[k] for k in CONDITION_KEYS): (c["n_cells"], c["in_train"]) for c in m.conditions(split)}
        counts = cells[split].groupby(list(CONDITION_KEYS)).size()
        assert got == {k: (int(v), k in in_train) for k, v in counts.items()}
        assert sum(c["n_cells"] for c in m.conditions(split)) == m.n_cells(split)
        assert [c["n_cells"] for c in m.conditions(split)] == sorted((c["n_cells"] for c in m.conditions(split)),
                                                                   reverse=True)
    assert all(c["in_train"] for c in m.conditions("train"))
    big = m.conditions("test", min_cells=30)
    assert big and all(c["n_cells"] >= 30 for c in big)
    # the fixture atlas holds out combinations no training study has, of labels training has
    unseen = m.conditions("val", unseen_only=True) + m.conditions("test", unseen_only=True)
    assert unseen and not any(c["in_train"] for c in unseen)
    for key in CONDITION_KEYS:
        assert {c[key] for c in unseen} <= set(cells["train"][key])
    # every tissue, cell type and disease of a held-out study is also in a training study
    for key in CONDITION_KEYS:
        for split in ("val", "test"):
            assert set(cells[split][key]) <= set(cells["train"][key]), (split, key)
    # each label's ontology term id, as the source's *_ontology_term_id columns have it
    ids = m.ontology_term_ids()
    columns = (*CONDITION_KEYS, *(f"{k}_ontology_term_id" for k in CONDITION_KEYS))
    every = pd.concat([pd.DataFrame({k: b[k] for k in columns}) for split in SPLITS
                       for b in read_split(shards_dir, split, fields=columns)])
    for key in CONDITION_KEYS:
        pairs = every[[key, f"{key}_ontology_term_id"]].drop_duplicates()
        assert ids[key] == dict(zip(pairs[key], pairs[f"{key}_ontology_term_id"])), key
    assert ids["disease"]["normal"] == "PATO:0000461"


def test_fitted_statistics_use_the_train_split_only(shards_dir):
    m = Manifest.load(shards_dir)
    assert m.data["gene_stats"]["split"] == m.data["hvg"]["split"] == "train"
    assert sum(g["n"] for g in m.data["library_size"]["groups"]) == m.n_cells("train")
    assert sum(m.data["cell_types"]["train"].values()) == m.n_cells("train")
    for split in CELL_SPLITS:
        assert sum(m.data["cell_types"][split].values()) == m.n_cells(split)


def test_cell_split_is_a_pure_function_of_obs_and_settings():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"soma_joinid": np.arange(3000), "dataset_id": rng.choice(["a", "b", "c"], 3000),
                        "cell_type": rng.choice(["T", "B", "NK"], 3000, p=[0.6, 0.35, 0.05]),
                        "tissue_general": "blood", "disease": rng.choice(["normal", "flu"], 3000)})
    study = {"a": "train", "b": "train", "c": "test"}
    cfg = ShardConfig(source="-", out="-", heldout_cell_fraction=0.05)
    a, b = split_cells(obs, study, cfg), split_cells(obs, study, cfg)
    assert (a == b).all()
    assert set(a[obs["dataset_id"] == "c"]) == {"test"}
    assert set(a[obs["dataset_id"] != "c"]) == {"train", "val_cells", "test_cells"}
    cfg.seed = 1
    assert (split_cells(obs, study, cfg) != a).any()
    cfg.heldout_cell_fraction = 0.0
    assert set(split_cells(obs, study, cfg)) == {"train", "test"}
    cfg.heldout_cell_fraction = 0.7
    with pytest.raises(ValueError, match="heldout_cell_fraction"):
        split_cells(obs, study, cfg)


def test_cell_split_equals_the_groupby_definition():
    """split_cells streams obs in batches and works on integer codes and ranks; it must give
    what the plain definition gives: (study, condition) groups from a pandas groupby (missing
    labels in no group), visited in the order of their labels as text, cells in id order."""
    from clopdit_dist.data.shards import CELL_SPLITS

    rng = np.random.default_rng(3)
    n = 5000
    obs = pd.DataFrame({"soma_joinid": np.arange(n), "dataset_id": rng.choice(["s1", "s2", "s3", "s4"], n),
                        "cell_type": rng.choice(["T", "B", "NK", None], n, p=[0.5, 0.3, 0.15, 0.05]),
                        "tissue_general": rng.choice(["blood", "lung"], n), "disease": rng.choice(["normal", "flu"], n)})
    study = {"s1": "train", "s2": "train", "s3": "val", "s4": "train"}
    cfg = ShardConfig(source="-", out="-", heldout_cell_fraction=0.04, seed=5)

    split = obs["dataset_id"].map(study).to_numpy().astype(object)
    train = np.flatnonzero(split == "train")
    groups = obs.iloc[train].groupby(["dataset_id", *CONDITION_KEYS], sort=True, observed=True).indices
    rng_ref = np.random.default_rng([cfg.seed, 17])
    for key in sorted(groups, key=lambda k: tuple(map(str, k))):
        rows = train[groups[key]]
        take = [int(np.floor(len(rows) * cfg.heldout_cell_fraction + rng_ref.random())) for _ in CELL_SPLITS]
        perm, start = rng_ref.permutation(rows), 0
        for name, k in zip(CELL_SPLITS, take):
            k = min(k, len(rows) - start)
            split[perm[start:start + k]] = name
            start += k
    for frame in (obs, obs.astype({c: "category" for c in ["dataset_id", *CONDITION_KEYS]})):
        for batch_rows in (None, 613):  # the planner streams obs: a group's ranks carry over between batches
            got = split_cells(frame, study, cfg, batch_rows=batch_rows)
            assert got.codes.dtype.itemsize == 1 and list(got.categories) == list(SPLITS)
            assert (np.asarray(got) == split).all()
    assert (split[obs["cell_type"].isna().to_numpy()] == np.where(obs["dataset_id"] == "s3", "val", "train")[
        obs["cell_type"].isna().to_numpy()]).all()


def test_shards_do_not_depend_on_the_worker_count(atlas_dir, shards_dir, tmp_path):
    out = str(tmp_path / "two_workers")
    build_shards(shard_config(atlas_dir, out, workers=2), progress=False, log=lambda *_: None)
    a, b = Manifest.load(shards_dir), Manifest.load(out)
    assert [(s["name"], s["sha256"]) for s in a.data["shards"]] == [(s["name"], s["sha256"]) for s in b.data["shards"]]
    assert a.data["conditions"] == b.data["conditions"] and a.data["held_out_cells"] == b.data["held_out_cells"]
    plan = load_plan(os.path.join(out, BUILD_DIR))  # what each worker loads: ids mapped, not read in
    assert isinstance(plan.joinids, np.memmap) and plan.offsets[-1] == len(plan.joinids) == ATLAS_CFG.n_cells


def test_two_nodes_build_one_shard_set(atlas_dir, shards_dir, tmp_path):
    """Two machines into one --out (here two processes at once): each builds its own shards of
    the same plan, the one that completes the set writes the manifest, and the shards are those
    of a one-machine build."""
    out = str(tmp_path / "two_nodes")
    cmd = [sys.executable, "-m", "clopdit_dist.cli", "data", "shards", "--source", atlas_dir, "--out", out,
           "--num-nodes", "2", "--no-progress", "--cells-per-block", "64", "--blocks-per-shard", "4"]
    procs = [subprocess.Popen([*cmd, "--node-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = Manifest.load(shards_dir), Manifest.load(out)
    assert [(s["name"], s["sha256"]) for s in a.data["shards"]] == [(s["name"], s["sha256"]) for s in b.data["shards"]]
    assert a.data == b.data
    # a node rank outside the nodes is refused in one line
    bad = subprocess.run([*cmd, "--node-rank", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--node-rank 0 .. 1" in bad.stderr and "Traceback" not in bad.stderr


def test_old_manifests_and_joined_split_names_are_explained(shards_dir, tmp_path):
    m = Manifest.load(shards_dir)
    with pytest.raises(ValueError, match="'val', 'test'"):
        m.shards("val+test")
    old = dict(m.data, schema_version=1)
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump(old, f)
    with pytest.raises(ValueError, match="version 1.*val_cells.*Rebuild"):
        Manifest.load(str(tmp_path))


def test_the_plan_streamed_in_small_obs_batches_is_the_same_plan(atlas_dir, shards_dir, tmp_path, monkeypatch):
    """The planner reads obs twice in TileDB's batches and keeps none; batches of a few hundred
    rows (as the Census's 60M cells come in ~250k-row batches) must give the saved plan exactly."""
    from clopdit_dist.data import source
    from clopdit_dist.data.plan import count_groups, make_plan

    monkeypatch.setattr(source, "OBS_READ_BUFFER_BYTES", 2048)
    cfg = shard_config(atlas_dir, shards_dir)
    with source.CellSource(cfg.query()) as src:
        columns = ("soma_joinid", "dataset_id", *CONDITION_KEYS)
        assert len([len(b) for b in src.obs_batches(columns)]) > 4
        plan = make_plan(count_groups(src.obs_batches(columns)), cfg, lambda: src.obs_batches(columns),
                         str(tmp_path / "build"))
    saved = load_plan(os.path.join(shards_dir, BUILD_DIR))
    assert plan.shards == saved.shards and plan.cells_per_study == saved.cells_per_study
    assert (plan.offsets == saved.offsets).all() and (np.asarray(plan.joinids) == np.asarray(saved.joinids)).all()
    assert sorted(os.listdir(tmp_path / "build")) == ["plan.joinids.npy", "plan.json"]  # no spool left behind
    with pytest.raises(ValueError, match="soma_joinid order"):
        count_groups([pd.DataFrame({"soma_joinid": [3, 1], "dataset_id": ["a", "a"]})])
