"""Which split indices a host's batches hold, step by step: the order as pure functions of the step.

`TrainPlan` is the input contract (`streams.batch_indices`: epoch e a seeded permutation of the
whole split, global batch t the next batch_size indices, host p rows [p*b, (p+1)*b)); `EvalPlan`
visits given indices once, padded.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from simclr_jax.data.streams import batch_indices, epoch_order


class Plan(Protocol):
    """Which split indices a host's batches hold, step by step."""

    batch: int  # rows of one host batch

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(split indices int64 [batch], -1 for padding; stream positions int64 [batch])."""
        ...

    def replacement(self, position: int, attempt: int) -> int | None:
        """The split index tried instead of an undecodable row's (attempt 1, 2, ...), or None."""
        ...


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Rows [first, first + batch) of every global batch of `batch_indices(seed, n, ...)`.

    `keep`: the order runs over these split indices (a label subset) instead of all `n`.
    Position of a row = step * global batch + row: the same on every host count, and the seed
    of its crops.
    """

    seed: int
    n: int
    global_batch: int
    first: int
    batch: int
    keep: np.ndarray | None = None

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's split indices and positions of global batch `step`."""
        order = batch_indices(self.seed, self.n, self.global_batch, step)
        index = order[self.first : self.first + self.batch].astype(np.int64)
        if self.keep is not None:
            index = self.keep[index].astype(np.int64)
        start = step * self.global_batch + self.first
        return index, np.arange(start, start + self.batch, dtype=np.int64)

    def replacement(self, position: int, attempt: int) -> int | None:
        """The index `attempt` places after the row's in its epoch's permutation (wrapping)."""
        step, row = divmod(position, self.global_batch)
        epoch, i = divmod(step, self.n // self.global_batch)
        order = epoch_order(self.seed, self.n, epoch)
        index = int(order[(i * self.global_batch + row + attempt) % self.n])
        return int(self.keep[index]) if self.keep is not None else index


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """`indices` in order, `batch` at a time; the last batch padded with -1."""

    indices: np.ndarray
    batch: int

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's indices (padded) and positions step * batch + row."""
        index = np.full(self.batch, -1, np.int64)
        chunk = self.indices[step * self.batch : (step + 1) * self.batch]
        index[: len(chunk)] = chunk
        start = step * self.batch
        return index, np.arange(start, start + self.batch, dtype=np.int64)

    def replacement(self, position: int, attempt: int) -> int | None:
        """None: evaluation masks an undecodable row out instead."""
        return None
