"""Labelled streams for the downstream jobs (linear evaluation, fine-tuning, kNN).

A host holds `prefetch + 2` batches, never the split. Train streams follow the pretraining
stream's rules (seeded, per host, resumable by step); eval streams visit every example of a split
exactly once, each host its own shard, padded to the same number of batches on every host with
'mask' 0 on the padding rows. Label subsets: a class-balanced fraction (indices), SimCLR's
official ImageNet 1% / 10% through tfds `imagenet2012_subset`, or a file of image names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from simclr_jax.data.datasets import (
    EVAL_CROP_FRACTION,
    IN_MEMORY_DATASETS,
    OFFICIAL_SUBSETS,
    TFDS_SPLITS,
    Batch,
    dataset_info,
    dataset_name,
    digits_arrays,
    folder_splits,
    import_tf,
    import_tfds,
    memory_arrays,
    tfds_builder,
    tfds_num_examples,
)
from simclr_jax.data.decode import decode_centre
from simclr_jax.data.streams import Prefetcher, host_seed, memory_batches, tf_options

if TYPE_CHECKING:
    import ml_collections


def _split_name(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return split


def _labelled_config(config: ml_collections.ConfigDict, subset: str) -> ml_collections.ConfigDict:
    """`config` reading the tfds builder of an official subset name instead of config.dataset."""
    if subset not in OFFICIAL_SUBSETS:
        raise ValueError(
            f"config.finetune.subset={subset!r} is not an official subset; allowed: "
            f"{', '.join(OFFICIAL_SUBSETS)} (imagenet2012), or a text file of image file names "
            "(image_folder)."
        )
    if config.dataset != "imagenet2012":
        raise ValueError(
            f"config.finetune.subset={subset!r} is an ImageNet subset; config.dataset is "
            f"{config.dataset!r}. Use finetune.label_fraction for other datasets."
        )
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.dataset = OFFICIAL_SUBSETS[subset]
    return c


def read_subset_file(path: str) -> set[str]:
    """Image file names (one a line, as google-research/simclr imagenet_subsets/*.txt)."""
    if not os.path.isfile(path):
        raise ValueError(
            f"config.finetune.subset={path!r} is neither an official subset "
            f"({', '.join(OFFICIAL_SUBSETS)}) nor a file of image names."
        )
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def subset_indices(config: ml_collections.ConfigDict, subset: str) -> np.ndarray | None:
    """Indices into the train split of the images a subset file names (image_folder), or None.

    None for an official tfds subset (read from its own builder) or no subset.
    """
    if not subset or subset in OFFICIAL_SUBSETS:
        return None
    names = read_subset_file(subset)
    if config.dataset != "image_folder":
        raise ValueError(
            f"config.finetune.subset={subset!r} (a file of image names) needs "
            f"config.dataset='image_folder', not {config.dataset!r}."
        )
    paths, _ = folder_splits(config.data.folder)[1]["train"]
    keep = np.flatnonzero([os.path.basename(p) in names for p in paths])
    if not len(keep):
        raise ValueError(
            f"none of the {len(names)} images named in {subset} is in {config.data.folder}/train."
        )
    return keep


def _check_labelled(config: ml_collections.ConfigDict, split: str) -> None:
    """Refuses a dataset/split without labels (STL-10 has labels only on train and test)."""
    if config.dataset == "image_folder" or config.dataset in IN_MEMORY_DATASETS:
        return
    if "label" not in tfds_builder(config).info.features:
        raise ValueError(f"config.dataset={config.dataset!r} has no labels for split {split!r}.")


def train_labels(config: ml_collections.ConfigDict) -> np.ndarray:
    """int32 labels of the labelled train split in its fixed order (images are not decoded)."""
    name = dataset_name(config)
    if name == "digits":
        return digits_arrays(config.data.image_size)["train"][1].copy()
    if name == "image_folder":
        return folder_splits(config.data.folder)[1]["train"][1].copy()
    tfds = import_tfds()
    records = tfds_builder(config).as_dataset(
        split=TFDS_SPLITS[name]["train"],
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    labels = records.map(lambda ex: ex["label"]).batch(4096).as_numpy_iterator()
    return np.concatenate(list(labels) or [np.zeros((0,), np.int32)]).astype(np.int32)


def labelled_size(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    keep: np.ndarray | None = None,
    subset: str = "",
    max_examples: int = 0,
) -> int:
    """Examples in a labelled split (train: after `keep` / `subset`; capped at `max_examples`)."""
    name = dataset_name(config)
    if _split_name(split) == "train" and keep is None and subset in OFFICIAL_SUBSETS:
        config = _labelled_config(config, subset)
    _check_labelled(config, split)
    if split == "train" and keep is not None:
        n = len(keep)
    elif split == "train" and subset in OFFICIAL_SUBSETS:
        n = tfds_num_examples(tfds_builder(config), "train")
    elif split == "test":
        n = dataset_info(config).num_test_examples
    elif name in ("digits", "image_folder"):
        n = len(train_labels(config))
    else:
        n = tfds_num_examples(tfds_builder(config), TFDS_SPLITS[name]["train"])
    return min(n, max_examples) if max_examples else n


def _labelled_records(
    config: ml_collections.ConfigDict,
    split: str,
    keep: np.ndarray | None,
    process_index: int,
    process_count: int,
    seed: int | None,
    drop_remainder: bool,
    max_examples: int = 0,
) -> tuple[Any, Callable[[Any], Any]]:
    """(tf.data of this host's {'image', 'label'} records, fn to encoded bytes)."""
    tf = import_tf()
    if config.dataset == "image_folder":
        paths, labels = folder_splits(config.data.folder)[1][split]
        if keep is not None:
            paths, labels = paths[keep], labels[keep]
        if max_examples:
            paths, labels = paths[:max_examples], labels[:max_examples]
        # Equal shares keep the hosts' epochs in step (train); eval keeps every example.
        per_host = len(paths) // process_count if drop_remainder else len(paths)
        paths, labels = (a[process_index::process_count][:per_host] for a in (paths, labels))
        records = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        return records, tf.io.read_file
    tfds = import_tfds()
    builder = tfds_builder(config)
    name = TFDS_SPLITS[config.dataset][split]
    skip = {"image": tfds.decode.SkipDecoding()}
    if keep is not None:  # a selection by index: every host filters the fixed order
        table = np.zeros(int(keep.max()) + 1 if len(keep) else 1, bool)
        table[keep] = True
        table = tf.constant(table)
        records = builder.as_dataset(split=name, shuffle_files=False, decoders=skip)
        records = records.enumerate().filter(
            lambda i, ex: tf.logical_and(i < tf.size(table, tf.int64), tf.gather(table, i))
        )
        records = records.map(lambda i, ex: ex).shard(process_count, process_index)
        return records.take(len(keep) // process_count), tf.identity
    if max_examples:
        name = f"{name}[:{max_examples}]"
    records = builder.as_dataset(
        split=tfds.split_for_jax_process(
            name,
            process_index=process_index,
            process_count=process_count,
            drop_remainder=drop_remainder,
        ),
        shuffle_files=seed is not None,
        decoders=skip,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    return records, tf.identity


def _memory_split(
    config: ml_collections.ConfigDict, split: str, keep: np.ndarray | None, max_examples: int
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = memory_arrays(config, split)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    if max_examples:
        images, labels = images[:max_examples], labels[:max_examples]
    return images, labels


def labelled_train_iterator(
    config: ml_collections.ConfigDict,
    batch_size: int,
    *,
    keep: np.ndarray | None = None,
    subset: str = "",
    augment: bool = True,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Endless per-host labelled train batches {'image': uint8 [b, H, H, 3], 'label': int32 [b]}.

    `b = batch_size // process_count`; the stream starts at global batch `start_step` and equals
    the uninterrupted one from there. `keep` selects train indices (a label fraction), `subset`
    an official tfds subset. With `augment` the host sends the whole centre square at
    `data.host_size` (or `data.image_size`) for the device's random resized crop; without it,
    the eval centre crop at `data.image_size`.
    """
    dataset_name(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes.")
    b = batch_size // process_count
    if subset in OFFICIAL_SUBSETS:
        config = _labelled_config(config, subset)
    elif subset and keep is None:
        keep = subset_indices(config, subset)
    _check_labelled(config, "train")
    if config.dataset in IN_MEMORY_DATASETS:
        images, labels = _memory_split(config, "train", keep, 0)
        if len(labels) < batch_size:
            raise ValueError(f"batch_size={batch_size} > {len(labels)} labelled train examples.")
        rows = slice(process_index * b, (process_index + 1) * b)
        batches = memory_batches(images, labels, seed, batch_size, rows, start_step)
    else:
        tf = import_tf()
        stream_seed = host_seed(seed, process_index)
        records, load = _labelled_records(
            config, "train", keep, process_index, process_count, stream_seed, drop_remainder=True
        )
        size = config.data.image_size
        side, fraction = (
            (config.data.host_size or size, 1.0)
            if augment
            else (size, EVAL_CROP_FRACTION.get(config.dataset, 1.0))
        )

        def prepare(example: Any) -> dict[str, Any]:
            image = decode_centre(load(example["image"]), side, fraction)
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = records.shuffle(config.data.shuffle_buffer, seed=stream_seed)
        ds = ds.repeat().skip(start_step * b)
        ds = ds.map(prepare, num_parallel_calls=2 * config.data.num_threads or tf.data.AUTOTUNE)
        ds = ds.batch(b, drop_remainder=True).prefetch(1)
        batches = ds.with_options(tf_options(config)).as_numpy_iterator()
    return Prefetcher(batches, config.data.prefetch) if config.data.prefetch > 0 else batches


def eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    batch_size: int,
    *,
    max_examples: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[Iterator[Batch], int]:
    """(this host's batches of a labelled split, their count): every example exactly once.

    Batches are {'image': uint8 [b, S, S, 3] centre crops, 'label': int32 [b], 'mask': bool [b]}
    with `b = batch_size // process_count`. Host p reads its own shard (about 1/process_count of
    the split); every host yields the same number of batches, padded with mask False.
    """
    _split_name(split)
    dataset_name(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes.")
    _check_labelled(config, split)
    b = batch_size // process_count
    total = labelled_size(config, split, max_examples=max_examples)
    per_host = -(-total // process_count)
    num_batches = -(-per_host // b)
    size = config.data.image_size
    if config.dataset in IN_MEMORY_DATASETS:
        images, labels = _memory_split(config, split, None, max_examples)
        images, labels = images[process_index::process_count], labels[process_index::process_count]

        def memory() -> Iterator[Batch]:
            for i in range(num_batches):
                x, y = images[i * b : (i + 1) * b], labels[i * b : (i + 1) * b]
                pad = b - len(y)
                yield {
                    "image": np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]),
                    "label": np.concatenate([y, np.zeros((pad,), np.int32)]),
                    "mask": np.arange(b) < len(y),
                }

        return memory(), num_batches
    tf = import_tf()
    records, load = _labelled_records(
        config, split, None, process_index, process_count, None, False, max_examples
    )
    fraction = EVAL_CROP_FRACTION.get(config.dataset, 1.0)  # cifar: the whole 32 px image
    ds = records.map(
        lambda ex: {
            "image": decode_centre(load(ex["image"]), size, fraction),
            "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(True),
        },
        num_parallel_calls=config.data.num_threads or tf.data.AUTOTUNE,
    )
    pad = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([size, size, 3], tf.uint8),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
    ).repeat()
    ds = ds.concatenate(pad).take(num_batches * b).batch(b).prefetch(2)
    return ds.with_options(tf_options(config)).as_numpy_iterator(), num_batches
