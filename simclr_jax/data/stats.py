"""Counts of a stream's skipped (undecodable) records, and the stop when too many are bad."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

# config.data.max_bad_fraction's default: more bad files than this fraction of those read stop.
MAX_BAD_FRACTION = 0.01
# The fraction is taken of at least this many reads, so a bad file among the first few images
# of a run does not count as "all of them".
BAD_FRACTION_MIN_READS = 1000
_NAMED_BAD_FILES = 5  # files a stop names
_NAME_CHARS = 300  # of each name that processes exchange (the end: the file name)


class BadDataError(ValueError):
    """Too many records of a split cannot be decoded; the message names the first ones."""


@dataclasses.dataclass
class StreamStats:
    """Counts of a stream's records: read (decoded or tried), bad (skipped), first bad names.

    The producer counts as it assembles batches; with `keep_history` (set by a consumer before
    the first batch, as the run loop does) it notes the counts after each one (`batch_done`), so
    a consumer that is batches behind (a prefetch queue) reads the counts of exactly the batches
    it took (`through`). `decide_locally`: the stream stops itself when too much is bad; a
    multi-process run loop sets it False before the first batch and decides with the other
    processes on the summed counts (`runtime.loop`), so all stop at the same step.
    """

    read: int = 0
    bad: int = 0
    bad_names: list[str] = dataclasses.field(default_factory=list)
    max_fraction: float = MAX_BAD_FRACTION
    decide_locally: bool = True
    keep_history: bool = False
    # (read, bad, len(bad_names)) after each batch not yet passed by `through`, oldest first.
    _after: collections.deque = dataclasses.field(default_factory=collections.deque, repr=False)
    _dropped: int = 0  # batches whose entry `through` dropped

    def add_bad(self, name: str) -> None:
        """Counts one undecodable record."""
        self.bad += 1
        if len(self.bad_names) < _NAMED_BAD_FILES:
            self.bad_names.append(name)

    def batch_done(self) -> None:
        """Notes the counts after the batch just assembled (called by the producer)."""
        if self.keep_history:  # else nobody asks: nothing accumulates
            self._after.append((self.read, self.bad, len(self.bad_names)))

    def through(self, batches: int) -> StreamStats:
        """The counts of the stream's first `batches` batches (produced by now; `keep_history`).

        Entries before it are dropped: a consumer asks for increasing counts of batches, so the
        history holds at most the batches between two questions plus those queued ahead.
        """
        if batches <= 0:
            return StreamStats(max_fraction=self.max_fraction)
        while self._dropped < batches - 1:
            self._after.popleft()
            self._dropped += 1
        read, bad, named = self._after[0]
        return StreamStats(read, bad, self.bad_names[:named], self.max_fraction)

    def over_limit(self) -> bool:
        """More than `max_fraction` of what was read is bad (of at least the minimum reads)."""
        return self.bad > self.max_fraction * max(self.read, BAD_FRACTION_MIN_READS)

    def check(self) -> None:
        """Raises BadDataError if more than `max_fraction` of what was read is bad."""
        if self.over_limit():
            raise BadDataError(
                f"{self.bad} of {self.read} records read cannot be decoded, more than "
                f"data.max_bad_fraction={self.max_fraction} allows (of at least "
                f"{BAD_FRACTION_MIN_READS}); first: {', '.join(self.bad_names)}. Remove or fix "
                "them, or raise data.max_bad_fraction."
            )

    def summary(self) -> dict[str, Any]:
        """The counts as JSON types (what processes exchange to agree)."""
        short = _NAME_CHARS - 3
        names = [n if len(n) <= _NAME_CHARS else "..." + n[-short:] for n in self.bad_names]
        return {"read": self.read, "bad": self.bad, "bad_names": names}

    @classmethod
    def summed(cls, summaries: list[dict[str, Any]], max_fraction: float) -> StreamStats:
        """The counts of several processes' `summary()`s, the first bad names in process order."""
        names = [n for s in summaries for n in s["bad_names"]][:_NAMED_BAD_FILES]
        read, bad = sum(s["read"] for s in summaries), sum(s["bad"] for s in summaries)
        return cls(read, bad, names, max_fraction)


@dataclasses.dataclass
class JointStats:
    """The counts of streams consumed in lockstep (one batch of each per step) as one stream's.

    Distillation draws a batch of train images and one of labelled images each step: the run
    loop reads, and several processes agree on, their summed counts as on a single stream's.
    """

    parts: list[StreamStats]

    @property
    def max_fraction(self) -> float:
        """The limit of the first part (the streams of one run share `data.max_bad_fraction`)."""
        return self.parts[0].max_fraction

    @property
    def decide_locally(self) -> bool:
        """Whether each stream stops itself (one process) or the loop decides (several)."""
        return all(p.decide_locally for p in self.parts)

    @decide_locally.setter
    def decide_locally(self, value: bool) -> None:
        for p in self.parts:
            p.decide_locally = value

    @property
    def keep_history(self) -> bool:
        """Whether the streams note their counts after each batch (`StreamStats.through`)."""
        return all(p.keep_history for p in self.parts)

    @keep_history.setter
    def keep_history(self, value: bool) -> None:
        for p in self.parts:
            p.keep_history = value

    def through(self, batches: int) -> StreamStats:
        """The summed counts of every stream's first `batches` batches."""
        summaries = [p.through(batches).summary() for p in self.parts]
        return StreamStats.summed(summaries, self.max_fraction)
