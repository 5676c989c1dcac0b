"""Stream mechanics shared by the pretraining and the labelled streams: the in-memory epoch order,
tf.data options, per-host seeds and the background prefetcher."""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from simclr_jax.data.datasets import Batch, import_tf
from simclr_jax.data.stats import JointStats

if TYPE_CHECKING:
    import ml_collections


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, n: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` over `n` examples: a seeded permutation of the whole split.

    The one definition of the training order, for data in memory and streamed alike. Cached
    (read-only) for the epoch in progress and the next one: a resume computes one permutation.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.setflags(write=False)
    return order


def batch_indices(seed: int, n: int, batch_size: int, step: int) -> np.ndarray:
    """Split indices of global batch `step`: the next `batch_size` of the concatenated epochs.

    Each epoch's tail of `n % batch_size` indices is dropped, so an epoch is
    `n // batch_size` steps; O(1) in `step`.
    """
    epoch, i = divmod(step, n // batch_size)
    return epoch_order(seed, n, epoch)[i * batch_size : (i + 1) * batch_size]


def memory_batches(
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch_size: int,
    rows: slice,
    step: int,
    with_index: bool = False,
) -> Iterator[Batch]:
    """Rows `rows` of every global batch from `step` on (`batch_indices`' order).

    `with_index`: batches also carry 'index', each example's row in the split (int32).
    """
    while True:
        index = batch_indices(seed, len(labels), batch_size, step)[rows]
        batch = {"image": images[index], "label": labels[index]}
        if with_index:
            batch["index"] = index.astype(np.int32)
        yield batch
        step += 1


def tf_options(config: ml_collections.ConfigDict) -> Any:
    """tf.data options: deterministic order, config.data.num_threads threads (0: TF's choice).

    With num_threads = n > 0 the pipeline's work runs on a private pool of n threads, each op on
    one thread, so n bounds the host cores it keeps busy.
    """
    options = import_tf().data.Options()
    options.deterministic = True
    if config.data.num_threads:
        options.threading.private_threadpool_size = config.data.num_threads
        # Per-image ops are small: splitting one over threads costs more than it saves, and
        # without this cap they would borrow TF's global intra-op pool beyond the n threads.
        options.threading.max_intra_op_parallelism = 1
        options.autotune.cpu_budget = config.data.num_threads
    return options


def host_seed(seed: int, process_index: int) -> int:
    """The seed of a host's shuffle and crops (`crop_windows`) for root seed `seed`."""
    return int(np.random.default_rng([seed, process_index]).integers(2**31))


class Prefetcher(Iterator[Batch]):
    """Iterates `source` on a daemon thread, keeping up to `size` items ready.

    The thread starts at the first `next`: until then the consumer may still set up the source
    (a run loop of several processes takes over the bad-file decision: `StreamStats`).
    """

    def __init__(self, source: Iterator[Batch], size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        # The source's counters (a streamed source's `StreamStats`), readable while it runs.
        self.stats = getattr(source, "stats", None)
        self._source = source  # closed here if the thread never starts
        # The thread gets no reference to self, so dropping the iterator collects it and stops it.
        self._thread = threading.Thread(
            target=_produce,
            args=(source, self._queue, self._stop),
            daemon=True,
            name="simclr_jax-data-prefetch",
        )

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise StopIteration
        if self._thread.ident is None:
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _End):
            self.close()
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer thread (it exits within 0.1 s), or the source if it never started."""
        self._stop.set()
        if self._thread.ident is None and hasattr(self._source, "close"):
            self._source.close()

    def __del__(self) -> None:
        self.close()


@dataclasses.dataclass
class _End:
    """The producer finished; `error` is what it raised, if anything."""

    error: BaseException | None = None


def _produce(source: Iterator[Batch], out: queue.Queue, stop: threading.Event) -> None:
    """Move items from `source` into `out` until it ends, fails, or `stop` is set."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)  # wake up now and then to notice `stop`
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in source:
            if not put(item):
                return
        put(_End())
    except BaseException as error:  # handed to the consumer, which re-raises it
        put(_End(error))
    finally:
        if hasattr(source, "close"):  # a streamed source stops its reader threads
            source.close()


class Joined:
    """Batches combined from streams read in lockstep, with their joint `stats` (or None).

    `combine(*batches)` makes one batch of one batch of each stream; the run loop takes the
    counts of skipped files of all the streams as one stream's (`stats.JointStats`).
    """

    def __init__(self, parts: list[Iterator[Batch]], combine: Callable[..., Batch]):
        self._parts, self._combine = parts, combine
        counted = [p.stats for p in parts if getattr(p, "stats", None) is not None]
        self.stats = JointStats(counted) if counted else None

    def __iter__(self) -> Joined:
        return self

    def __next__(self) -> Batch:
        return self._combine(*(next(p) for p in self._parts))

    def close(self) -> None:
        """Stops every stream's threads."""
        for p in self._parts:
            if hasattr(p, "close"):
                p.close()
