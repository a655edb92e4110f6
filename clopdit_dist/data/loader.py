"""Shards -> batches of cells, per rank and per DataLoader worker (the open_clip recipe).

Training (``resampled=True``): every (rank, worker) reads an endless stream of shards from
its own seed (passes over all shards, each pass in a new order) and stops after a fixed
number of batches, so every rank gets exactly the same number of batches per epoch
whatever the shard count (open_clip's ``ResampledShards`` + ``with_epoch``). Evaluation (``resampled=False``): shards are split by
rank, then by worker, and every cell is read exactly once.

Within a worker, decoded blocks pass a seeded shuffle buffer (``shuffle_blocks`` blocks);
every ``mix_blocks`` blocks are pooled, their cells permuted and cut into batches. All
randomness comes from ``(seed, epoch, rank, worker)``, so the stream is reproducible and the
loader can resume mid-epoch exactly: skipped batches are counted, not densified.

Training with ``exact=True``: every cell of the split once per epoch, in a global order that
does not depend on ranks or workers (``epoch.py``); blocks are read by offset from any shard.
A resume on another world size or worker count continues the epoch without repeating or
skipping a cell. The resampled stream instead carries the number of batches consumed over.

A batch is a dict: ``counts`` float32 (B, genes), ``library_size`` float32 (B,) (total raw
counts over the whole vocabulary), ``soma_joinid`` int64 (B,), one list of strings per
metadata field, and ``split``.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import CorruptShardError, GeneVocabularyError, ShardError
from .blocks import BLOCK_EXT, Block, decode_block, read_block_at, tar_block_offsets
from .epoch import EpochOrder, delivered_per_stream, remaining_ranges, split_ranges
from .manifest import Manifest

DEFAULT_FIELDS = ("cell_type", "tissue_general", "tissue", "disease", "assay", "dataset_id", "donor_id", "sex",
                  "development_stage", "suspension_type")


@dataclass
class LoaderConfig:
    split: str = "train"
    genes: str | list[str] = "hvg:2000"  # "all", "hvg:K", or gene ids/names
    batch_size: int = 256
    num_workers: int = 2
    fields: tuple[str, ...] = DEFAULT_FIELDS
    resampled: bool | None = None  # default: True for train, False otherwise
    shuffle_blocks: int = 32
    mix_blocks: int = 8
    seed: int = 0
    on_error: str = "raise"  # or "skip": skip an unreadable shard and warn
    batches_per_epoch: int | None = None  # per rank; default covers the split once
    exact: bool = False  # training: every cell once per epoch, resumable across world sizes (epoch.py)
    prefetch_factor: int = 4


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class CellDataset(IterableDataset):
    """The per-worker pipeline. Use :class:`CellLoader`, which owns epochs and resume."""

    def __init__(self, manifest: Manifest, cfg: LoaderConfig, gene_idx: np.ndarray, rank: int, world_size: int,
                 batches_per_worker: int | None):
        self.manifest, self.cfg, self.gene_idx = manifest, cfg, gene_idx
        self.rank, self.world_size = rank, world_size
        self.urls = manifest.shard_paths(cfg.split)
        self.batches_per_worker = batches_per_worker
        self.epoch = 0
        self.skip = 0  # batches of this epoch the whole loader has already delivered
        self.order: EpochOrder | None = None  # the exact stream: this epoch's global order ...
        self.ranges: list[list[int]] = []  # ... and the part of it left to draw
        self._offsets: dict[str, list[tuple[int, int]]] = {}

    @property
    def resampled(self) -> bool:
        return self.batches_per_worker is not None

    def __iter__(self):
        info = get_worker_info()
        phys, nw = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batches from its workers round-robin, starting at worker 0: batch n
        # of an epoch came from stream n % nw. On resume after `skip` batches, physical worker
        # 0 must play the stream that delivers batch `skip`.
        wid = (phys + self.skip) % nw
        skip = self.skip // nw + (1 if wid < self.skip % nw else 0)
        if self.order is not None:
            part = split_ranges(self.ranges, self.world_size * nw)[self.rank * nw + wid]
            yield from self._exact_batches(part, skip)
            return
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, wid])
        if self.resampled:
            urls = self._resampled_urls(rng)
        else:
            urls = iter(self.urls[self.rank::self.world_size][wid::nw])
        blocks = _shuffle(self._blocks(urls), self.cfg.shuffle_blocks, rng)
        yield from self._batches(blocks, rng, skip, self.batches_per_worker)

    def _resampled_urls(self, rng):
        if not self.urls:
            raise ShardError(f"split {self.cfg.split!r} of {self.manifest.path} has no shards")
        while True:  # passes over all shards, each in a fresh order: no repeats within a pass
            for i in rng.permutation(len(self.urls)):
                yield self.urls[i]

    def _blocks(self, urls):
        skipped = 0
        for url in urls:
            try:
                with open(url, "rb") as stream:
                    samples = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                    for sample in wds.tariterators.group_by_keys(samples):
                        payload = sample.get(BLOCK_EXT)
                        if payload is None:
                            raise ValueError(f"sample {sample.get('__key__')} has no .{BLOCK_EXT} member")
                        yield decode_block(payload)
            except Exception as exc:  # missing file, truncated tar, bad CRC, foreign member
                reason = f"{type(exc).__name__}: {str(exc.args[0]) if exc.args else exc}"
                if self.cfg.on_error != "skip":
                    raise self._unreadable(url, reason, ", or pass on_error='skip'") from exc
                skipped += 1
                warnings.warn(f"skipped unreadable shard {url} ({reason}); {skipped} shard(s) skipped so far "
                              "by this worker", RuntimeWarning, stacklevel=2)

    def _exact_batches(self, part: list[list[int]], skip: int):
        """The batches at positions ``part`` of the epoch's global order (``epoch.py``)."""
        order, B = self.order, self.cfg.batch_size
        fields = [*self.cfg.fields, "soma_joinid", "library_size"]
        current, n = None, 0
        for a, b in part:
            for position in range(a, b):
                n += 1
                if n <= skip:
                    continue
                unit, j = order.locate(position)
                if unit != current:
                    group = [self._read_block(*ref) for ref in order.blocks(unit)]
                    X = sp.vstack([g.X for g in group], format="csr")
                    obs = {f: np.concatenate([_column(g.obs, f) for g in group]) for f in fields}
                    perm = order.cell_permutation(unit, X.shape[0])
                    dense, current = X[:, self.gene_idx].toarray(), unit
                rows = perm[j * B:(j + 1) * B]
                yield self._make_batch(dense[rows], obs, rows)

    def _read_block(self, shard: int, block: int) -> Block:
        url = self.urls[shard]
        try:
            if url not in self._offsets:
                self._offsets[url] = tar_block_offsets(url)
            return read_block_at(url, *self._offsets[url][block])
        except Exception as exc:  # an exact epoch cannot skip a shard: every rank's batch count would change
            raise self._unreadable(url, f"{type(exc).__name__}: {str(exc.args[0]) if exc.args else exc}", "") from exc

    def _unreadable(self, url: str, reason: str, alternative: str) -> CorruptShardError:
        return CorruptShardError(
            f"shard {url} is unreadable ({reason}). Check the shards with `clopdit data verify "
            f"{self.manifest.root}`, delete the bad file and rerun build_shards.py with the same arguments (it "
            f"rebuilds only missing shards){alternative}.")

    def _batches(self, blocks, rng, skip: int, limit: int | None):
        B, fields = self.cfg.batch_size, [*self.cfg.fields, "soma_joinid", "library_size"]
        carry: list = []  # blocks holding the cells left over from the previous pool
        produced = 0
        exhausted = False
        while not exhausted and (limit is None or produced < limit):
            group = list(carry)
            for _ in range(self.cfg.mix_blocks):
                try:
                    group.append(next(blocks))
                except StopIteration:
                    exhausted = True
                    break
            if not group:
                break
            X = sp.vstack([b.X for b in group], format="csr") if len(group) > 1 else group[0].X
            obs = {f: np.concatenate([_column(b.obs, f) for b in group]) for f in fields}
            n = X.shape[0]
            perm = rng.permutation(n)
            last = n if exhausted else (n // B) * B  # at the end of the stream a short batch is kept
            dense = None
            for start in range(0, last, B):
                if limit is not None and produced >= limit:
                    break
                rows = perm[start:start + B]
                produced += 1
                if produced <= skip:
                    continue
                if dense is None:
                    dense = X[:, self.gene_idx].toarray()
                yield self._make_batch(dense[rows], obs, rows)
            rest = np.sort(perm[last:])
            carry = [Block(X[rest], {f: v[rest] for f, v in obs.items()})] if len(rest) else []

    def _make_batch(self, counts: np.ndarray, obs: dict, rows: np.ndarray) -> dict:
        batch = {"counts": torch.from_numpy(counts),
                 "library_size": torch.from_numpy(obs["library_size"][rows].astype(np.float32)),
                 "soma_joinid": torch.from_numpy(obs["soma_joinid"][rows].astype(np.int64)),
                 "split": self.cfg.split}
        for f in self.cfg.fields:
            batch[f] = obs[f][rows].tolist()
        return batch


def _column(obs: dict, name: str) -> np.ndarray:
    if name not in obs:
        raise GeneVocabularyError(f"metadata field {name!r} is not in the shards; they carry {sorted(obs)}")
    return obs[name]


def _keep_batch(batch: dict) -> dict:
    """DataLoader ``collate_fn``: batches are built whole in the workers (the default would
    walk every metadata string)."""
    return batch


def _shuffle(items, bufsize: int, rng):
    """Seeded shuffle buffer (webdataset's ``shuffle`` with an explicit generator)."""
    buf = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        yield buf[i]
        buf[i] = item
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


class CellLoader:
    """Batches of one split for one rank, with epochs and an exact resume position.

    >>> loader = CellLoader("shards/", LoaderConfig(split="train", genes="hvg:2000"))
    >>> for batch in loader: ...                 # one epoch
    >>> state = loader.state_dict()              # save with the checkpoint
    >>> loader.load_state_dict(state)            # continue from the same batch
    """

    def __init__(self, shards: str | Manifest, cfg: LoaderConfig | None = None, rank: int | None = None,
                 world_size: int | None = None):
        self.cfg = cfg or LoaderConfig()
        self.manifest = shards if isinstance(shards, Manifest) else Manifest.load(shards)
        r, w = dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.gene_idx = self.manifest.gene_indices(self.cfg.genes)
        resampled = self.cfg.resampled if self.cfg.resampled is not None else self.cfg.split == "train"
        nw = max(self.cfg.num_workers, 1)
        per_worker = None
        self.exact = resampled and self.cfg.exact
        if self.exact and (self.cfg.batches_per_epoch or self.cfg.on_error != "raise"):
            raise ValueError("the exact stream covers the split once per epoch and cannot skip a shard: leave "
                             "batches_per_epoch unset and on_error='raise', or use the resampled stream (exact=False)")
        if resampled and not self.exact:
            per_rank = self.cfg.batches_per_epoch or math.ceil(
                self.manifest.n_cells(self.cfg.split) / (self.cfg.batch_size * self.world_size))
            per_worker = max(1, math.ceil(per_rank / nw))
        self.dataset = CellDataset(self.manifest, self.cfg, self.gene_idx, self.rank, self.world_size, per_worker)
        self._block_cells = self.manifest.block_cells(self.cfg.split) if self.exact else None
        self._order: EpochOrder | None = None
        self.epoch = 0
        self.batches_done = 0
        self.ranges: list[list[int]] | None = None  # exact stream: what is left of this epoch (None: all of it)

    @property
    def gene_names(self) -> list[str]:
        return self.manifest.feature_names[self.gene_idx].tolist()

    @property
    def gene_ids(self) -> list[str]:
        return self.manifest.feature_ids[self.gene_idx].tolist()

    def _epoch_order(self) -> EpochOrder:
        order = self._order
        if order is None or order.epoch != self.epoch:  # one per epoch: __len__, state_dict and __iter__ ask
            order = self._order = EpochOrder(self._block_cells, self.cfg.seed, self.epoch, self.cfg.mix_blocks,
                                             self.cfg.batch_size)
        streams = self.world_size * max(self.cfg.num_workers, 1)
        if self.ranges is None:
            self.ranges = [[0, order.n_batches]]
            if order.n_batches < streams:
                raise ShardError(f"split {self.cfg.split!r} has {order.n_batches} batches per epoch, fewer than "
                                 f"{streams} (ranks x workers): lower batch_size, mix_blocks or num_workers")
        return order

    def __len__(self) -> int:
        """Batches per epoch on this rank (exact for training streams; an estimate otherwise)."""
        if self.exact:
            self._epoch_order()
            streams = self.world_size * max(self.cfg.num_workers, 1)
            return sum(b - a for a, b in self.ranges) // streams * max(self.cfg.num_workers, 1)
        if self.dataset.resampled:
            return self.dataset.batches_per_worker * max(self.cfg.num_workers, 1)
        n = sum(s["n_cells"] for s in self.manifest.shards(self.cfg.split)[self.rank::self.world_size])
        return math.ceil(n / self.cfg.batch_size)

    def __iter__(self):
        ds = self.dataset
        ds.epoch, ds.skip = self.epoch, self.batches_done
        if self.exact:
            ds.order, ds.ranges = self._epoch_order(), self.ranges
        nw = self.cfg.num_workers
        loader = DataLoader(ds, batch_size=None, collate_fn=_keep_batch, num_workers=nw,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None)
        for batch in loader:
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0
        self.ranges = None

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.cfg.seed,
                 "split": self.cfg.split, "world_size": self.world_size, "num_workers": self.cfg.num_workers,
                 "exact": self.exact}
        if self.exact:
            self._epoch_order()
            state.update(ranges=self.ranges, batch_size=self.cfg.batch_size, mix_blocks=self.cfg.mix_blocks)
        return state

    def load_state_dict(self, state: dict) -> str:
        """Continue where ``state`` was taken. With the same world size and workers the batches
        are those of the uninterrupted run. Otherwise the exact stream splits what is left of
        the epoch among the new ranks and workers (no cell repeated or skipped); the resampled
        stream carries the number of batches consumed over, rounded up to whole batches of the
        new world. Returns a line saying which."""
        current = {"seed": self.cfg.seed, "exact": self.exact}
        if self.exact:  # they define the epoch's order
            current.update(batch_size=self.cfg.batch_size, mix_blocks=self.cfg.mix_blocks)
        for key, value in current.items():
            if state.get(key, False) != value:
                raise ValueError(f"loader state was saved with {key}={state.get(key, False)}; this loader has "
                                 f"{value}. Resume with the same {key}.")
        self.epoch, done = int(state["epoch"]), int(state["batches_done"])
        self.ranges = state.get("ranges")
        old, new = (state["world_size"], state["num_workers"]), (self.world_size, self.cfg.num_workers)
        if old == new:
            self.batches_done = done
            return f"epoch {self.epoch}, batch {done} of this rank"
        if self.exact:
            self.ranges = remaining_ranges(self.ranges, old[0] * max(old[1], 1), delivered_per_stream(done, *old))
            self.batches_done = 0
            left = sum(b - a for a, b in self.ranges)
            return (f"epoch {self.epoch}: the {left} batches not yet drawn by {old[0]} rank(s) x {old[1]} worker(s) "
                    f"go to {new[0]} x {new[1]}")
        consumed = done * old[0]  # batches of the epoch, all ranks together
        self.batches_done = math.ceil(consumed / self.world_size)
        return f"epoch {self.epoch}, {consumed} of its batches (old world) -> {self.batches_done} per rank"


def iter_split(shards: str, split: str, genes, max_cells: int, batch_size: int = 512, fields=("cell_type",)):
    """Batches of one or more splits joined by "+" ("val", "test", "val+test"), every cell
    once, in a fixed order, up to ``max_cells`` cells per split: how held-out cells are read."""
    for name in split.split("+"):
        loader = CellLoader(shards, LoaderConfig(split=name, genes=genes, batch_size=batch_size, num_workers=0,
                                                 resampled=False, fields=tuple(fields)), rank=0, world_size=1)
        seen = 0
        for batch in loader:
            if seen >= max_cells:
                break
            yield batch
            seen += batch["counts"].shape[0]
