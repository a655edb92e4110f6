"""The WebDataset loader: exact resume, two ranks over gloo, corrupt shards, gene selection."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from clopdit_dist.data.loader import CellLoader, CorruptShardError, LoaderConfig
from clopdit_dist.data.manifest import Manifest

HERE = os.path.dirname(__file__)


def cfg(**kw):
    base = dict(split="train", genes="hvg:64", batch_size=48, num_workers=0, shuffle_blocks=4, mix_blocks=2)
    base.update(kw)
    return LoaderConfig(**base)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(shards_dir, workers):
    full = CellLoader(shards_dir, cfg(num_workers=workers))
    epoch0 = list(full)
    epoch1 = list(full)
    assert len(epoch0) == len(full) == len(epoch1)
    assert not torch.equal(epoch0[0]["soma_joinid"], epoch1[0]["soma_joinid"])  # a new order each epoch

    first = CellLoader(shards_dir, cfg(num_workers=workers))
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state["batches_done"] == 5

    resumed = CellLoader(shards_dir, cfg(num_workers=workers))
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states travel through checkpoints
    rest = list(resumed)
    assert len(rest) == len(epoch0) - 5
    for a, b in zip(rest, epoch0[5:]):
        assert torch.equal(a["soma_joinid"], b["soma_joinid"])
        assert torch.equal(a["counts"], b["counts"])
        assert a["cell_type"] == b["cell_type"]
    assert resumed.epoch == 1
    assert torch.equal(next(iter(resumed))["soma_joinid"], epoch1[0]["soma_joinid"])


def test_resume_refuses_a_different_worker_count(shards_dir):
    state = CellLoader(shards_dir, cfg(num_workers=0)).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        CellLoader(shards_dir, cfg(num_workers=2)).load_state_dict(state)


def test_two_ranks_get_disjoint_shards_and_equal_batch_counts(shards_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    os.path.join(HERE, "scripts", "two_rank_loader.py"), shards_dir, str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=300)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    m = Manifest.load(shards_dir)
    # training: the same number of batches on both ranks, as the loader promised
    assert r0["train"]["batches"] == r1["train"]["batches"] == r0["train"]["len"] > 0
    assert r0["train"]["ids"] != r1["train"]["ids"]
    # evaluation: each rank reads its own shards; together every cell exactly once
    for split in ("val", "test"):
        a, b = set(r0[split]["ids"]), set(r1[split]["ids"])
        assert a and b and not (a & b)
        assert len(r0[split]["ids"]) + len(r1[split]["ids"]) == m.n_cells(split)


def _broken_copy(shards_dir, tmp_path, damage):
    out = tmp_path / "shards"
    shutil.copytree(shards_dir, out)
    m = Manifest.load(str(out))
    victim = m.shard_paths("train")[1]
    damage(victim)
    return str(out), os.path.basename(victim)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 7)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, os.remove], ids=["truncated", "bitflip", "missing"])
def test_unreadable_shard_is_named_or_skipped(shards_dir, tmp_path, damage):
    broken, name = _broken_copy(shards_dir, tmp_path, damage)
    with pytest.raises(CorruptShardError, match=name):
        list(CellLoader(broken, cfg(resampled=False)))
    assert name in Manifest.load(broken).verify()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(CellLoader(broken, cfg(resampled=False, on_error="skip")))
    skipped = [w for w in caught if issubclass(w.category, RuntimeWarning) and name in str(w.message)]
    assert len(skipped) == 1 and "1 shard(s) skipped" in str(skipped[0].message)
    n = sum(b["counts"].shape[0] for b in batches)
    assert 0 < n < Manifest.load(broken).n_cells("train")


def test_gene_selection_by_name_and_missing_genes_named(shards_dir):
    loader = CellLoader(shards_dir, cfg(genes=["CD8A", "MS4A1", "ALB"]))
    batch = next(iter(loader))
    assert batch["counts"].shape == (48, 3) and loader.gene_names == ["CD8A", "MS4A1", "ALB"]
    with pytest.raises(KeyError, match="NOT_A_GENE.*ALSO_MISSING"):
        CellLoader(shards_dir, cfg(genes=["CD8A", "NOT_A_GENE", "ALSO_MISSING"]))
    with pytest.raises(ValueError, match="HVGs"):
        CellLoader(shards_dir, cfg(genes="hvg:100000"))
    with pytest.raises(KeyError, match="not_a_field"):
        next(iter(CellLoader(shards_dir, cfg(fields=("cell_type", "not_a_field")))))
