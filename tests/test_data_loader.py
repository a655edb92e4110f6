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


@pytest.mark.parametrize("workers,exact", [(0, False), (2, False), (2, True)])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(shards_dir, workers, exact):
    full = CellLoader(shards_dir, cfg(num_workers=workers, exact=exact))
    epoch0 = list(full)
    epoch1 = list(full)
    assert len(epoch0) == len(full) == len(epoch1)
    assert not torch.equal(epoch0[0]["soma_joinid"], epoch1[0]["soma_joinid"])  # a new order each epoch

    first = CellLoader(shards_dir, cfg(num_workers=workers, exact=exact))
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state["batches_done"] == 5

    resumed = CellLoader(shards_dir, cfg(num_workers=workers, exact=exact))
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states travel through checkpoints
    rest = list(resumed)
    assert len(rest) == len(epoch0) - 5
    for a, b in zip(rest, epoch0[5:]):
        assert torch.equal(a["soma_joinid"], b["soma_joinid"])
        assert torch.equal(a["counts"], b["counts"])
        assert a["cell_type"] == b["cell_type"]
    assert resumed.epoch == 1
    assert torch.equal(next(iter(resumed))["soma_joinid"], epoch1[0]["soma_joinid"])


def test_resampled_stream_carries_the_batch_count_to_another_world(shards_dir):
    first = CellLoader(shards_dir, cfg(num_workers=0), rank=0, world_size=2)
    it = iter(first)
    for _ in range(3):
        next(it)
    one = CellLoader(shards_dir, cfg(num_workers=2), rank=0, world_size=1)
    assert "6 of its batches" in one.load_state_dict(first.state_dict())
    assert one.batches_done == 6 and len(list(one)) == len(one) - 6


def test_exact_stream_refuses_a_state_of_another_order(shards_dir):
    state = CellLoader(shards_dir, cfg(exact=True)).state_dict()
    with pytest.raises(ValueError, match="batch_size=48"):
        CellLoader(shards_dir, cfg(exact=True, batch_size=32)).load_state_dict(state)
    with pytest.raises(ValueError, match="exact=True"):
        CellLoader(shards_dir, cfg()).load_state_dict(state)


def _take(loader, n=None):
    """soma_joinids of the next ``n`` batches (all of the epoch when None)."""
    if n is None:
        n = len(loader) - loader.batches_done
        batches = list(loader)
        assert len(batches) == n
        return [i for b in batches for i in b["soma_joinid"].tolist()]
    it = iter(loader)
    return [i for _ in range(n) for i in next(it)["soma_joinid"].tolist()]


@pytest.mark.parametrize("worlds", [[(2, 2), (1, 0)], [(1, 0), (2, 2)], [(2, 0), (1, 2), (2, 0)]],
                         ids=["2->1", "1->2", "2->1->2"])
def test_exact_stream_resumes_on_another_world_without_repeating_or_skipping_a_cell(shards_dir, worlds):
    """Each world (ranks, workers) draws a few batches on every rank and checkpoints; the last
    one finishes the epoch. Every training cell is drawn once, except the final leftover of
    fewer than ranks x workers batches (clopdit_dist/data/epoch.py)."""
    train = Manifest.load(shards_dir).n_cells("train")
    drawn, state = [], None
    for i, (world, workers) in enumerate(worlds):
        loaders = [CellLoader(shards_dir, cfg(num_workers=workers, exact=True), rank=r, world_size=world)
                   for r in range(world)]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))
        last = i == len(worlds) - 1
        counts = {len(loader) for loader in loaders}
        assert len(counts) == 1  # every rank draws the same number of batches
        for loader in loaders:
            drawn += _take(loader, None if last else 3)
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)  # one state for the whole job: rank 0 saves it
        state = states[0]
    assert len(drawn) == len(set(drawn))
    streams = worlds[-1][0] * max(worlds[-1][1], 1)
    assert train - streams * 48 < len(drawn) <= train
    assert state["epoch"] == 1 and state["batches_done"] == 0


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_exact_epoch_draws_every_cell_once(shards_dir, world, workers):
    loaders = [CellLoader(shards_dir, cfg(num_workers=workers, exact=True), rank=r, world_size=world)
               for r in range(world)]
    epochs = [[_take(loader) for loader in loaders] for _ in range(2)]
    train = Manifest.load(shards_dir).n_cells("train")
    for per_rank in epochs:
        ids = [i for rank in per_rank for i in rank]
        assert len(ids) == len(set(ids)) and train - world * max(workers, 1) * 48 < len(ids) <= train
    if world == 1 and workers == 0:
        assert sorted(ids) == sorted(epochs[0][0])  # a single stream draws all of them
    assert epochs[0][0][:48] != epochs[1][0][:48]  # a new order each epoch


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
    with pytest.raises(CorruptShardError, match=name):
        list(CellLoader(broken, cfg(exact=True)))
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


def test_block_sizes_are_read_from_the_blocks_when_the_manifest_predates_them(shards_dir, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards_dir, out)
    manifest = json.load(open(out / "manifest.json"))
    for s in manifest["shards"]:
        del s["block_sizes"]
    json.dump(manifest, open(out / "manifest.json", "w"))
    expected = Manifest.load(shards_dir).block_cells("train")
    assert Manifest.load(str(out)).block_cells("train") == expected
    assert sum(map(sum, expected)) == Manifest.load(shards_dir).n_cells("train")
