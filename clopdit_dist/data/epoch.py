"""The exact training stream's order: every cell of a split once per epoch, in an order that
does not depend on the number of ranks or workers, so a run resumes on another world size
without repeating or skipping a cell (``LoaderConfig.exact``).

Epoch ``e``: the split's blocks in a seeded permutation of ``(seed, e)``, cut into units of
``mix_blocks`` blocks (drawn from all shards, so a batch mixes studies); a unit's cells are
permuted by ``(seed, e, unit)`` and cut into batches of ``batch_size``, the unit's last batch
short. Concatenated, the units' batches are the epoch's global sequence of ``N`` batches.

The epoch's remaining work is a list of ranges of that sequence, ``[[0, N]]`` at its start.
Its ``C = world_size x num_workers`` consumers (consumer ``rank * num_workers + worker``) take
equal contiguous parts of the concatenated ranges (:func:`split_ranges`); the ``R mod C < C``
batches left over are not drawn this epoch, the only cells an epoch leaves out. On a resume
with another world size or worker count, what every old consumer has not yet delivered,
plus that leftover, becomes the new range list (:func:`remaining_ranges`) and is split again
among the new consumers: a cell is drawn once or, if it falls in the final leftover, not at all.
"""

from __future__ import annotations

import numpy as np

Ranges = list[list[int]]  # [[start, stop], ...] positions in the epoch's global batch sequence


class EpochOrder:
    """The global batch sequence of one epoch. ``block_cells[s][k]`` is the number of cells in
    block ``k`` of shard ``s`` (shards of one split, manifest order)."""

    def __init__(self, block_cells: list[list[int]], seed: int, epoch: int, mix_blocks: int, batch_size: int):
        self.seed, self.epoch, self.batch_size = seed, epoch, batch_size
        shard = np.concatenate([np.full(len(c), s, np.int64) for s, c in enumerate(block_cells)] or [[]])
        block = np.concatenate([np.arange(len(c), dtype=np.int64) for c in block_cells] or [[]])
        cells = np.concatenate([np.asarray(c, np.int64) for c in block_cells] or [[]])
        order = np.random.default_rng([seed, epoch]).permutation(len(cells))
        self.units = [order[i:i + mix_blocks] for i in range(0, len(order), mix_blocks)]
        self._shard, self._block, self._cells = shard, block, cells
        n_batches = [-(-int(cells[u].sum()) // batch_size) for u in self.units]
        self.unit_start = np.concatenate([[0], np.cumsum(n_batches, dtype=np.int64)])

    @property
    def n_batches(self) -> int:
        return int(self.unit_start[-1])

    def locate(self, position: int) -> tuple[int, int]:
        """(unit, batch within the unit) of a position of the global sequence."""
        unit = int(np.searchsorted(self.unit_start, position, side="right")) - 1
        return unit, position - int(self.unit_start[unit])

    def blocks(self, unit: int) -> list[tuple[int, int]]:
        """(shard, block) pairs of a unit, in the order their cells are concatenated."""
        return [(int(self._shard[i]), int(self._block[i])) for i in self.units[unit]]

    def cell_permutation(self, unit: int, n_cells: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, unit]).permutation(n_cells)


def split_ranges(ranges: Ranges, parts: int) -> list[Ranges]:
    """Cut the concatenation of ``ranges`` into ``parts`` equal contiguous parts (the
    remainder, fewer than ``parts`` positions, is left out)."""
    per = sum(b - a for a, b in ranges) // parts
    out: list[Ranges] = [[] for _ in range(parts)]
    part, room = 0, per
    for a, b in ranges:
        while a < b and part < parts:
            take = min(room, b - a)
            if take:
                out[part].append([a, a + take])
            a, room = a + take, room - take
            if room == 0:
                part, room = part + 1, per
    return out


def remaining_ranges(ranges: Ranges, parts: int, delivered: list[int]) -> Ranges:
    """What is left of ``ranges`` after consumer ``c`` of ``parts`` delivered the first
    ``delivered[c]`` positions of its part: every undelivered position, the leftover of the
    split included, in sequence order."""
    left: Ranges = []
    taken = split_ranges(ranges, parts)
    for part, done in zip(taken, delivered):
        for a, b in part:
            skip = min(done, b - a)
            done -= skip
            if a + skip < b:
                left.append([a + skip, b])
    covered = sum(b - a for part in taken for a, b in part)
    position = 0
    for a, b in ranges:  # the leftover: positions past the last part
        start = max(a, a + covered - position)
        if start < b:
            left.append([start, b])
        position += b - a
    return _merge(sorted(left))


def delivered_per_stream(batches_done: int, world_size: int, num_workers: int) -> list[int]:
    """Positions each consumer has delivered after every rank took ``batches_done`` batches:
    a rank's DataLoader takes batch ``n`` from its worker ``n % num_workers``."""
    nw = max(num_workers, 1)
    per_worker = [batches_done // nw + (1 if w < batches_done % nw else 0) for w in range(nw)]
    return per_worker * world_size


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out
