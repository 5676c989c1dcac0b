"""The streamed pipeline: a step's split indices (`Plan`), read by Grain, decoded by tf.data.

Three stages, each bounded:

1. Order: `Plan.rows(step)` gives the split indices and stream positions of this host's rows of
   global batch `step` (pure functions of the step: `streams.batch_indices`), so a stream starts at
   any step in O(1).
2. Read: a Grain `MapDataset` over chunks of `READ_CHUNK` rows fetches them from a random-access
   source (`sources`: ArrayRecord records; an image folder's file paths, which TF reads) on
   `data.read_threads` threads (default `READ_THREADS`), `READ_AHEAD_PER_THREAD` chunks a thread
   ahead at most.
3. Decode: tf.data parses a chunk's serialized records in one op, reads files and decodes them
   (the crop-window JPEG decode of `decode`) on `config.data.num_threads` threads, a host batch
   at a time. Calling TF once per
   image from Python threads (Grain's) cost 0.5-1.1 ms more CPU per image than tf.data's map,
   which runs the graph without Python, so TF keeps the decode and Grain the order and the I/O.

A batch with a record that cannot be read or decoded (an empty file, text named .jpg, a truncated
JPEG) is dropped by tf.data and its rows are decoded here one by one: a file that cannot be read
stops the stream (OSError names it); one that cannot be decoded is skipped. Train streams take
the next index of the same epoch's permutation instead (`Plan.replacement`, at the same stream
position, so with the crops the row would have had), evaluation streams mask the row out. Both
are pure functions of the step: a resumed stream skips and replaces the same files. More than
`max_bad_fraction` bad of what was read stops the stream with one line naming the first files.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from simclr_jax.data.datasets import Batch, import_tf
from simclr_jax.data.host_malloc import retain_freed_memory
from simclr_jax.data.plans import EvalPlan, Plan, TrainPlan  # noqa: F401  (re-exported)
from simclr_jax.data.sources import Source
from simclr_jax.data.stats import (  # noqa: F401  (re-exported)
    _NAMED_BAD_FILES,
    BAD_FRACTION_MIN_READS,
    MAX_BAD_FRACTION,
    BadDataError,
    StreamStats,
)
from simclr_jax.data.streams import tf_options

if TYPE_CHECKING:
    import ml_collections

log = logging.getLogger(__name__)

# Records per Grain element: one read call, handed to tf.data in one call. 128 (a whole host
# batch at ImageNet's batch size per host) cost ~0.1 ms less CPU per image than 32 for
# ArrayRecord (fewer hand-offs into tf.data); held at most READ_AHEAD_PER_THREAD x threads x
# 128 encoded records (~56 MB of ImageNet JPEGs at the defaults).
READ_CHUNK = 128
# config.data.read_threads' default: Grain reader threads. Reads from local disk or the page
# cache hold the GIL for part of their ~40 us a record; 8 threads cost 1.7x the CPU per record of
# 1 there. Storage with latency (network file systems, object stores) wants more.
READ_THREADS = 2
READ_AHEAD_PER_THREAD = 2  # chunks read ahead per thread: bounds the encoded bytes held
MAX_REPLACEMENT_ATTEMPTS = 16  # consecutive bad candidates for one row before giving up


def max_bad_fraction(config: ml_collections.ConfigDict) -> float:
    """config.data.max_bad_fraction (the schema's default is MAX_BAD_FRACTION)."""
    return float(config.data.max_bad_fraction)


Prepare = Callable[[Any, Any], dict[str, Any]]  # (encoded image, position) -> tensors


@functools.lru_cache(maxsize=32)
def _element_fn(serialized: bool, prepare: Prepare, paths: bool = False) -> Any:
    """The per-record tf.function: read (`paths`), parse (`serialized`), decode; keep label and
    position.

    Cached with its traced graph: building the crop-window decode's graph took ~0.5 s, which
    every stream (each resume, each evaluation) would otherwise pay again.
    """
    tf = import_tf()
    signature = {
        "record": tf.TensorSpec([], tf.string),
        "label": tf.TensorSpec([], tf.int32),
        "position": tf.TensorSpec([], tf.int64),
        "index": tf.TensorSpec([], tf.int64),
    }

    def element(ex: dict[str, Any]) -> dict[str, Any]:
        if serialized:
            parsed = tf.io.parse_single_example(ex["record"], _example_features())
            image, label = parsed["image"], tf.cast(parsed["label"], tf.int32)
        else:
            image, label = ex["record"], ex["label"]
        if paths:  # in TF's threads: reading in Python cost ~40 us more per 100 KB file
            image = tf.io.read_file(image)
        out = dict(prepare(image, ex["position"]))
        out.update(label=label, position=ex["position"], index=ex["index"])
        return out

    # No autograph: the decode is written in TF ops.
    return tf.function(element, input_signature=[signature], autograph=False)


def _parse_chunk(ex: dict[str, Any]) -> dict[str, Any]:
    """A chunk's serialized tf.Examples parsed in one op: 'record' becomes the image bytes.

    Before the unbatch, so it splits fresh image tensors (moved, not copied as the serialized
    records were) and the per-record graph only decodes. A chunk that fails to parse is dropped
    like a failed batch and its rows parsed one by one (`Stream._decode_one`).
    """
    tf = import_tf()
    parsed = tf.io.parse_example(ex["record"], _example_features())
    return {**ex, "record": parsed["image"], "label": tf.cast(parsed["label"], tf.int32)}


def _example_features() -> dict[str, Any]:
    """The tf.Example features read: the encoded image and its label (-1 where unlabelled)."""
    tf = import_tf()
    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        # Unlabelled splits (STL-10's) store -1; a dataset without labels has none.
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


def read_threads(config: ml_collections.ConfigDict) -> int:
    """config.data.read_threads (the schema's default is READ_THREADS)."""
    return int(config.data.read_threads)


def _reader(
    source: Source, plan: Plan, start_step: int, num_steps: int | None, threads: int
) -> Any:
    """Grain dataset of chunks {'record', 'label', 'position', 'index'} from `start_step` on."""
    import grain

    size = READ_CHUNK
    chunks = -(-plan.batch // size)
    total = chunks * num_steps if num_steps is not None else 2**62

    def read(element: int) -> dict[str, np.ndarray]:
        step, chunk = divmod(element, chunks)
        indices, positions = plan.rows(start_step + step)
        rows = slice(chunk * size, (chunk + 1) * size)
        indices, positions = indices[rows], positions[rows]
        real = indices >= 0  # padding rows are not read
        records, labels = source.read(indices[real])
        count = int(real.sum())
        return {
            "record": np.array(records, dtype=object).reshape(count),
            "label": np.zeros(count, np.int32) if labels is None else labels.astype(np.int32),
            "position": positions[real],
            "index": indices[real],
        }

    options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=READ_AHEAD_PER_THREAD * threads
    )
    return grain.MapDataset.range(total).map(read).to_iter_dataset(options)


def _chunks(reader: Iterator[Any], errors: list[BaseException]) -> Iterator[Any]:
    """The reader's chunks; a read error is kept in `errors` (tf.data would drop it)."""
    try:
        yield from reader
    except Exception as error:  # noqa: BLE001  (re-raised by Stream)
        errors.append(error)


class Stream(Iterator[Batch]):
    """A host's batches of `plan` from `start_step`: read, decoded, refilled where a record failed.

    Yields {**prepare's keys, 'label'} plus 'index' (int32 split indices, `with_index`) and
    'mask' (bool, False on padding and masked rows, `with_mask`). `stats` counts what was read
    and skipped; `close()` stops the reader threads.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        source: Source,
        plan: Plan,
        prepare: Prepare,
        *,
        start_step: int = 0,
        num_steps: int | None = None,
        with_index: bool = False,
        with_mask: bool = False,
        max_bad_fraction: float = MAX_BAD_FRACTION,
    ):
        tf = import_tf()
        self.stats = StreamStats(max_fraction=max_bad_fraction)
        self._source, self._plan = source, plan
        self._step, self._stop = start_step, None if num_steps is None else start_step + num_steps
        self._with_index, self._with_mask = with_index, with_mask
        self._reader = iter(_reader(source, plan, start_step, num_steps, read_threads(config)))
        self._read_error: list[BaseException] = []
        # Serialized records are parsed a chunk at a time (`_parse_chunk`), then decoded.
        element = _element_fn(False, prepare, source.paths)
        signature = {
            "record": tf.TensorSpec([None], tf.string),
            "label": tf.TensorSpec([None], tf.int32),
            "position": tf.TensorSpec([None], tf.int64),
            "index": tf.TensorSpec([None], tf.int64),
        }
        # The generator holds the reader, not the stream: dropping the stream collects it.
        chunks = functools.partial(_chunks, self._reader, self._read_error)
        # 2n calls in flight on the n threads: a thread that finishes one image starts the next
        # at once instead of sleeping until tf.data's scheduler thread wakes up (~4% images/s).
        calls = 2 * config.data.num_threads or tf.data.AUTOTUNE
        ds = tf.data.Dataset.from_generator(chunks, output_signature=signature)
        if source.serialized:
            ds = ds.map(_parse_chunk)
        ds = ds.unbatch()
        ds = ds.map(element, num_parallel_calls=calls).batch(plan.batch)
        # A batch with a record that fails to read, parse or decode is dropped whole, and
        # `_assemble` decodes its rows one by one. Dropping single records instead (before the
        # batch) kept tf.data from fusing map and batch: 0.15 ms more CPU per image.
        ds = ds.ignore_errors().prefetch(1).with_options(tf_options(config))
        self._spec = ds.element_spec
        self._decoded = ds.as_numpy_iterator()
        # After the iterator, whose from_generator op sets glibc's mmap threshold to 128 KiB:
        # freed chunks and per-image buffers would be faulted in again (host_malloc).
        retain_freed_memory()
        # One record's graph for those rows, on bytes read here.
        self._one = _element_fn(source.serialized, prepare)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, config.data.num_threads or os.cpu_count() or 1),
            thread_name_prefix="simclr_jax-data-refill",
        )
        self._buffer: dict[str, np.ndarray] | None = None
        self._cursor = 0

    def __next__(self) -> Batch:
        if self._decoded is None or (self._stop is not None and self._step >= self._stop):
            raise StopIteration
        batch = self._assemble(*self._plan.rows(self._step))
        self._step += 1
        self.stats.batch_done()
        return batch

    def close(self) -> None:
        """Stops the reader threads; the stream ends."""
        reader, self._reader, self._decoded = self._reader, None, None
        if reader is not None and hasattr(reader, "close"):
            reader.close()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)

    def __del__(self) -> None:
        self.close()

    # ---------------------------------------------------------------- assembling a step

    def _peek(self) -> np.ndarray | None:
        """Positions of the buffered decoded rows not yet taken (None: the stream ended)."""
        while self._buffer is None or self._cursor >= len(self._buffer["position"]):
            try:
                self._buffer, self._cursor = next(self._decoded), 0
            except StopIteration:
                if self._read_error:
                    raise self._read_error[0] from None
                self._buffer = None
                return None
        return self._buffer["position"][self._cursor :]

    def _assemble(self, indices: np.ndarray, positions: np.ndarray) -> Batch:
        """The step's batch: decoded rows in order, refilled or masked where one is missing."""
        real = indices >= 0
        self.stats.read += int(real.sum())
        ahead = self._peek()
        if (
            self._cursor == 0
            and ahead is not None
            and real.all()
            and np.array_equal(ahead, positions)
        ):  # every row decoded, aligned with tf.data's batch: no copy
            batch, self._buffer = self._buffer, None
            return self._finish(batch, np.ones(len(indices), bool))
        rows = [self._take(p) if r else None for p, r in zip(positions, real, strict=True)]
        missing = [i for i in np.flatnonzero(real) if rows[i] is None]
        # In parallel: a dropped batch has `batch` rows to decode here (TF releases the GIL).
        found = self._pool.map(lambda i: self._decode(int(indices[i]), int(positions[i])), missing)
        for i, (row, bad, tried) in zip(missing, found, strict=True):
            rows[i] = row
            self.stats.read += tried
            for name in bad:
                self.stats.add_bad(name)
        if self.stats.decide_locally:
            self.stats.check()
        mask = real & np.array([row is not None for row in rows])
        zeros = {k: np.zeros(s.shape[1:], s.dtype.as_numpy_dtype) for k, s in self._spec.items()}
        batch = {
            k: np.stack([row[k] if row is not None else zeros[k] for row in rows]) for k in zeros
        }
        return self._finish(batch, mask)

    def _take(self, position: int) -> dict[str, np.ndarray] | None:
        """The decoded row at `position`, or None if tf.data dropped its batch."""
        ahead = self._peek()
        if ahead is None or ahead[0] != position:
            return None  # rows arrive in order: a later position means this one was dropped
        row = {k: v[self._cursor] for k, v in self._buffer.items()}
        self._cursor += 1
        return row

    def _decode_one(self, index: int, position: int) -> dict[str, np.ndarray] | None:
        """Record `index` decoded at `position`, or None if it cannot be decoded.

        A file that cannot be read raises (OSError names it): only decoding fails softly.
        """
        tf = import_tf()
        _, labels = self._source.read(np.array([index]))
        example = {
            "record": tf.constant(self._source.fetch(index)),
            "label": tf.constant(0 if labels is None else int(labels[0]), tf.int32),
            "position": tf.constant(position, tf.int64),
            "index": tf.constant(index, tf.int64),
        }
        try:
            return {k: v.numpy() for k, v in self._one(example).items()}
        # A record that is no tf.Example can raise TF's parse error with its raw bytes in the
        # message, which TF then fails to decode as UTF-8.
        except (tf.errors.OpError, UnicodeDecodeError):
            return None

    def _decode(
        self, index: int, position: int
    ) -> tuple[dict[str, np.ndarray] | None, list[str], int]:
        """(row or None if masked, names of the bad records met, extra records read).

        The row's own record first (its batch may have been dropped for another row); if it is
        undecodable, the plan's replacements in turn.
        """
        row = self._decode_one(index, position)
        bad, tried, attempt = [], index, 0
        while row is None:
            bad.append(self._source.describe(tried))
            attempt += 1
            if attempt > MAX_REPLACEMENT_ATTEMPTS:
                raise BadDataError(
                    f"{len(bad)} records in a row cannot be decoded: "
                    f"{', '.join(bad[:_NAMED_BAD_FILES])}, ... Check the data."
                )
            candidate = self._plan.replacement(position, attempt)
            if candidate is None:
                log.warning("skipped undecodable %s (masked out)", bad[0])
                return None, bad, attempt - 1
            tried = candidate
            row = self._decode_one(tried, position)
        if bad:
            log.warning(
                "skipped undecodable %s, replaced by %s",
                ", ".join(bad),
                self._source.describe(tried),
            )
        return row, bad, attempt

    def _finish(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> Batch:
        """Drops the bookkeeping keys; adds 'index' / 'mask' where asked."""
        out = {k: v for k, v in batch.items() if k not in ("position", "index")}
        if self._with_index:
            out["index"] = batch["index"].astype(np.int32)
        if self._with_mask:
            out["mask"] = mask
        return out
