"""Shard building on real TileDB-SOMA and real tar files: coverage, splits, manifest, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clopdit_dist.data.loader import CellLoader, LoaderConfig
from clopdit_dist.data.manifest import Manifest
from clopdit_dist.data.shards import BUILD_DIR, build_shards
from clopdit_dist.data.source import CellSource, Query

from conftest import ATLAS_CFG, shard_config


def read_split(shards, split, **kw):
    loader = CellLoader(shards, LoaderConfig(split=split, genes="all", batch_size=100, num_workers=0,
                                             resampled=False, **kw))
    return list(loader)


def test_every_cell_once_and_studies_never_split(shards_dir):
    m = Manifest.load(shards_dir)
    seen, study_split = [], {}
    for split in ("train", "val", "test"):
        for batch in read_split(shards_dir, split):
            seen += batch["soma_joinid"].tolist()
            for study in batch["dataset_id"]:
                assert study_split.setdefault(study, split) == split
    assert sorted(seen) == list(range(ATLAS_CFG.n_cells))
    assert study_split == m.data["splits"]
    assert all(m.studies(s) for s in ("train", "val", "test"))
    assert sum(m.n_cells(s) for s in ("train", "val", "test")) == ATLAS_CFG.n_cells


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
    cells = [t for split in ("train", "val", "test") for b in read_split(out, split) for t in b["tissue_general"]]
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
    ids = [i for split in ("train", "val", "test") for batch in read_split(out, split)
           for i in batch["soma_joinid"].tolist()]
    assert sorted(ids) == list(range(ATLAS_CFG.n_cells))
