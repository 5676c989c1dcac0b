"""Host-side input pipeline: uint8 image batches, sliced per host, deterministic and resumable.

Two paths, picked by `config.dataset`:

* In memory (digits, cifar10, cifar100): the split is loaded once as a uint8 array and batches
  are indexed in numpy. Epoch e visits `np.random.default_rng([seed, e]).permutation(n)`; global
  batch t is the next `batch_size` indices of the concatenated epochs (each epoch's incomplete
  tail dropped) and host p takes rows `[p*b, (p+1)*b)` of it. The hosts of a step together hold
  exactly the single-host global batch, for any process count, and `start_step` resumes in O(1).
* tf.data (stl10, imagenet2012, image_folder): each host reads its own shard of the files
  (`tfds.split_for_jax_process`, or every process_count-th image file) through a seeded shuffle
  with deterministic tf.data. The stream is reproducible for a fixed seed, process index and
  count; `start_step` skips `start_step * b` records before decoding, so a resumed stream equals
  the uninterrupted one from that step on. Random crops use stateless ops seeded by the record's
  position in the host's stream, so parallel decoding does not change them. With host crops a
  JPEG is decoded once, inside the union of its two crop windows (`crop_windows`).

The modules below: `datasets` (names, sizes, arrays, builders, folders), `decode` (host crops),
`streams` (epoch order, tf.data options, prefetching); `labelled_data` holds the downstream jobs'
labelled streams. The names other modules use from `datasets` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from simclr_jax.data.datasets import (  # noqa: F401  (re-exported: data.dataset_info etc.)
    DATASETS,
    EVAL_CROP_FRACTION,
    IN_MEMORY_DATASETS,
    STREAMED_DATASETS,
    TFDS_SPLITS,
    Batch,
    DatasetInfo,
    DatasetNotAvailableError,
    dataset_info,
    dataset_name,
    folder_splits,
    import_tf,
    import_tfds,
    memory_arrays,
    tfds_builder,
    tfds_num_examples,
)
from simclr_jax.data.decode import (  # noqa: F401  (re-exported)
    crop_windows,
    decode_centre,
    decode_union_resized,
    decode_views,
    sample_crop_windows,
)
from simclr_jax.data.streams import Prefetcher, host_seed, memory_batches, tf_options

if TYPE_CHECKING:
    import ml_collections


def _records(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    with_index: bool = False,
) -> tuple[Any, Callable[[Any], Any]]:
    """(tf.data of {'image', 'label'}, fn turning 'image' into encoded bytes) for this host.

    `with_index`: records also carry 'index' int32, the example's position in the whole split
    (a memory bank needs it).
    """
    tf = import_tf()
    if config.dataset == "image_folder":
        _, splits = folder_splits(config.data.folder)
        paths, labels = splits["train" if split == "pretrain" else split]
        per_host = len(paths) // process_count  # equal shares keep the hosts' epochs in step
        columns = {"image": paths, "label": labels}
        if with_index:
            columns["index"] = np.arange(len(paths), dtype=np.int32)
        columns = {k: a[process_index::process_count][:per_host] for k, a in columns.items()}
        records = tf.data.Dataset.from_tensor_slices(columns)
        return records, tf.io.read_file
    if with_index:
        return _indexed_tfds_records(config, split, process_index, process_count, seed)
    tfds = import_tfds()
    builder = tfds_builder(config)
    tfds_split = tfds.split_for_jax_process(
        TFDS_SPLITS[config.dataset][split],
        process_index=process_index,
        process_count=process_count,
        drop_remainder=True,
    )
    records = builder.as_dataset(
        split=tfds_split,
        shuffle_files=seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},  # decode later, fused with the crop
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    return records, tf.identity


def _indexed_tfds_records(
    config: ml_collections.ConfigDict,
    split: str,
    process_index: int,
    process_count: int,
    seed: int | None,
) -> tuple[Any, Callable[[Any], Any]]:
    """`_records` of a tfds split with 'index': each example's position in the whole split.

    tfds numbers no examples, so each part of the split ('unlabelled+train': two) is read in its
    stored order as this host's even slice (`split_for_jax_process`'s shares), numbered as it is
    read, and the parts are mixed by a seeded sample. The files are not shuffled (the order must
    stay countable); the record-level shuffle buffer still mixes the stream.
    """
    tf, tfds = import_tf(), import_tfds()
    builder = tfds_builder(config)
    parts, weights, offset = [], [], 0
    for part in TFDS_SPLITS[config.dataset][split].split("+"):
        n = tfds_num_examples(builder, part)
        share = n // process_count
        start = process_index * share
        records = builder.as_dataset(
            split=f"{part}[{start}:{start + share}]",
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        ).take(share)  # mock_data ignores the slice; a real slice has exactly `share`
        first = offset + start
        parts.append(
            records.enumerate().map(
                lambda i, ex, first=first: {**ex, "index": tf.cast(i + first, tf.int32)}
            )
        )
        weights.append(float(share))
        offset += n
    if len(parts) == 1:
        return parts[0], tf.identity
    total = sum(weights)
    mixed = tf.data.Dataset.sample_from_datasets(
        parts, weights=[w / total for w in weights], seed=seed, stop_on_empty_dataset=False
    )
    return mixed, tf.identity


def _streamed_batches(
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    batch: int,
    step: int,
    with_index: bool = False,
) -> Iterator[Batch]:
    """This host's pretraining batches from a tfds dataset or image folder, from `step` on."""
    tf = import_tf()
    seed = host_seed(config.seed, process_index)
    records, load = _records(
        config,
        "pretrain",
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        with_index=with_index,
    )
    size, host_size = config.data.image_size, getattr(config.data, "host_size", 0)

    def prepare(position: Any, example: Any) -> dict[str, Any]:
        data = load(example["image"])
        label = tf.cast(example["label"], tf.int32)
        if not config.data.host_crop:
            return {"image": decode_centre(data, size, 1.0), "label": label}
        # Two independent crops of the original image, cut out here or (host_size) on device.
        if not host_size:
            return {"image": decode_views(data, size, seed, position), "label": label}
        image, boxes = decode_union_resized(data, size, host_size, seed, position)
        return {"image": image, "crop": boxes, "label": label}

    ds = records.shuffle(config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # Number the records before skipping, so crop seeds do not depend on where a run resumed.
    ds = ds.repeat().enumerate().skip(step * batch)
    # 2n calls in flight on the n threads: a thread that finishes one image starts the next at
    # once instead of sleeping until tf.data's scheduler thread wakes up (~4% more images/s).
    calls = 2 * config.data.num_threads or tf.data.AUTOTUNE
    if with_index:
        ds = ds.map(
            lambda position, ex: {**prepare(position, ex), "index": ex["index"]},
            num_parallel_calls=calls,
        )
    else:
        ds = ds.map(prepare, num_parallel_calls=calls)
    ds = ds.batch(batch, drop_remainder=True).prefetch(1)
    return ds.with_options(tf_options(config)).as_numpy_iterator()


def _streamed_arrays(
    config: ml_collections.ConfigDict, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-cropped eval images [N, S, S, 3] uint8 and labels [N] int32 of a tf.data dataset."""
    tf = import_tf()
    records, load = _records(config, split)
    if config.data.eval_max_examples:
        records = records.take(config.data.eval_max_examples)
    size, fraction = config.data.image_size, EVAL_CROP_FRACTION[config.dataset]
    ds = records.map(
        lambda ex: (
            decode_centre(load(ex["image"]), size, fraction),
            tf.cast(ex["label"], tf.int32),
        ),
        num_parallel_calls=config.data.num_threads or tf.data.AUTOTUNE,
    )
    batches = list(ds.batch(256).with_options(tf_options(config)).as_numpy_iterator())
    if not batches:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def pretrain_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    with_index: bool = False,
) -> Iterator[Batch]:
    """Endless per-host batches {'image': uint8 [b, S, S, 3], 'label': int32 [b]}.

    `with_index`: batches also carry 'index' int32 [b], each example's position in the training
    split, the same on every host and after a resume (for a memory bank; a tfds stream is then
    read without file shuffling, see `_indexed_tfds_records`).

    With `config.data.host_crop` images are two host crops [b, 2, S, S, 3], or with
    `config.data.host_size = H` the union of the two crop windows [b, H, H, 3] plus the windows
    'crop': float32 [b, 2, 4] (y, x, h, w in its pixels) that `augment.views` cuts out on device.
    `b = config.batch_size // process_count`; labels are -1 for unlabelled images. The
    stream starts at global batch `start_step`. Close the iterator (or drop it) to stop its thread.
    """
    name = dataset_name(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by "
            f"process_count={process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    batch = config.batch_size // process_count
    if name in IN_MEMORY_DATASETS:
        if config.data.host_crop or getattr(config.data, "host_size", 0):
            raise ValueError(
                f"config.data.host_crop and host_size are for {', '.join(STREAMED_DATASETS)}, "
                f"not {name}."
            )
        images, labels = memory_arrays(config, "train")
        if len(labels) < config.batch_size:
            raise ValueError(
                f"config.batch_size={config.batch_size} > {len(labels)} {name} examples."
            )
        rows = slice(process_index * batch, (process_index + 1) * batch)
        batches = memory_batches(
            images, labels, config.seed, config.batch_size, rows, start_step, with_index
        )
    else:
        batches = _streamed_batches(
            config, process_index, process_count, batch, start_step, with_index
        )
    return Prefetcher(batches, config.data.prefetch) if config.data.prefetch > 0 else batches


def eval_arrays(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, S, S, 3] and labels int32 [N] of a labelled split, in a fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if dataset_name(config) in IN_MEMORY_DATASETS:
        return memory_arrays(config, split, config.data.eval_max_examples)
    return _streamed_arrays(config, split)
