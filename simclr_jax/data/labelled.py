"""Labelled streams for the downstream jobs (linear evaluation, fine-tuning, kNN).

Streamed datasets run on the pretraining stream's sources and machinery (`pipeline.Stream`), so a
host holds a bounded number of batches, never the split. Train streams follow the pretraining
order (`streams.batch_indices`: a seeded permutation of the whole split or subset each epoch, host
p rows [p*b, (p+1)*b), resumable in O(1) at any step); eval streams visit every example of a split
exactly once, host p examples p, p + P, ..., padded to the same number of batches on every host
with 'mask' 0 on the padding rows. Label subsets are index lists on the train split's source
(`subsets`): a class-balanced fraction, SimCLR's official ImageNet 1% / 10%, a file of names.
A text dataset (`datasets.modality`) is served by `text_labelled` under the same contracts:
{'tokens': int32 [b, model.max_len], 'label'[, 'mask']} instead of 'image'.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np

from simclr_jax.data.datasets import (  # noqa: F401  (OFFICIAL_SUBSETS re-exported)
    EVAL_CROP_FRACTION,
    IN_MEMORY_DATASETS,
    OFFICIAL_SUBSETS,
    TFDS_SPLITS,
    Batch,
    dataset_info,
    dataset_name,
    digits_arrays,
    memory_arrays,
    modality,
    tfds_builder,
    tfds_num_examples,
)
from simclr_jax.data.decode import decoder
from simclr_jax.data.pipeline import EvalPlan, Stream, TrainPlan, max_bad_fraction
from simclr_jax.data.sources import open_source
from simclr_jax.data.streams import Prefetcher, memory_batches
from simclr_jax.data.subsets import (  # noqa: F401  (re-exported)
    read_subset_file,
    split_metadata,
    subset_indices,
)
from simclr_jax.data.text_labelled import (
    text_eval_batches,
    text_size,
    text_train_iterator,
    text_train_labels,
)

if TYPE_CHECKING:
    import ml_collections


def _split_name(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return split


def _is_text(config: ml_collections.ConfigDict, subset: str = "") -> bool:
    """Whether config.dataset is text (which has no image subsets: refused in one line)."""
    text = modality(dataset_name(config)) == "text"
    if text and subset:
        raise ValueError(
            f"subset={subset!r} names images; config.dataset={config.dataset!r} is text "
            "(use finetune.label_fraction)."
        )
    return text


def _check_labelled(config: ml_collections.ConfigDict, split: str) -> None:
    """Refuses a dataset/split without labels (STL-10 has labels only on train and test)."""
    if config.dataset == "image_folder" or config.dataset in IN_MEMORY_DATASETS:
        return
    if "label" not in tfds_builder(config).info.features:
        raise ValueError(f"config.dataset={config.dataset!r} has no labels for split {split!r}.")


def train_labels(config: ml_collections.ConfigDict) -> np.ndarray:
    """int32 labels of the labelled train split in its fixed order (images are not decoded)."""
    name = dataset_name(config)
    if _is_text(config):
        return text_train_labels(config)
    if name == "digits":
        return digits_arrays(config.data.image_size)["train"][1].copy()
    if name in IN_MEMORY_DATASETS:
        return memory_arrays(config, "train")[1]
    return split_metadata(config, "train")[0].copy()


def _train_keep(
    config: ml_collections.ConfigDict, keep: np.ndarray | None, subset: str
) -> np.ndarray | None:
    """The train indices of `keep`, else of a subset (official or a file of names), else None."""
    if keep is not None or not subset:
        return keep
    return subset_indices(config, subset)


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
    if _is_text(config, subset):
        n = text_size(config, _split_name(split), keep)
        return min(n, max_examples) if max_examples else n
    _check_labelled(config, _split_name(split))
    if split == "train":
        keep = _train_keep(config, keep, subset)
    if split == "train" and keep is not None:
        n = len(keep)
    elif split == "test":
        n = dataset_info(config).num_test_examples
    elif name in ("digits", "image_folder"):
        n = len(train_labels(config))
    else:
        n = tfds_num_examples(tfds_builder(config), TFDS_SPLITS[name]["train"])
    return min(n, max_examples) if max_examples else n


def _memory_split(
    config: ml_collections.ConfigDict, split: str, keep: np.ndarray | None, max_examples: int
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = memory_arrays(config, split)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    if max_examples:
        images, labels = images[:max_examples], labels[:max_examples]
    return images, labels


def _hosts(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process index, process count, per-host batch), checked."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes.")
    return process_index, process_count, batch_size // process_count


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
    with_index: bool = False,
) -> Iterator[Batch]:
    """Endless per-host labelled train batches {'image': uint8 [b, H, H, 3], 'label': int32 [b]}.

    `b = batch_size // process_count`; the stream starts at global batch `start_step` in O(1) and
    equals the uninterrupted one from there: the pretraining stream's order (`batch_indices` with
    `seed`) over the train split, or over `keep` (a label fraction) or `subset` (an official
    ImageNet subset or a file of image names: index lists on the same source). With `augment` the
    host sends the whole centre square at `data.host_size` (or `data.image_size`) for the
    device's random resized crop; without it, the eval centre crop at `data.image_size`.
    `with_index` (without `keep` or `subset`): batches also carry 'index' int32 [b], each
    example's row in the train split (e.g. to look up a cache of per-image values). A text
    dataset yields {'tokens': int32 [b, model.max_len], 'label'} (`augment` does not apply).
    """
    dataset_name(config)
    if with_index and (keep is not None or subset):
        raise ValueError("with_index is for the whole train split (no keep, no subset)")
    process_index, _, b = _hosts(batch_size, process_index, process_count)
    if _is_text(config, subset):
        batches = text_train_iterator(
            config,
            batch_size,
            keep=keep,
            seed=seed,
            first_row=process_index * b,
            rows=b,
            start_step=start_step,
            with_index=with_index,
        )
        return Prefetcher(batches, config.data.prefetch) if config.data.prefetch > 0 else batches
    keep = _train_keep(config, keep, subset)
    _check_labelled(config, "train")
    if config.dataset in IN_MEMORY_DATASETS:
        images, labels = _memory_split(config, "train", keep, 0)
        if len(labels) < batch_size:
            raise ValueError(f"batch_size={batch_size} > {len(labels)} labelled train examples.")
        rows = slice(process_index * b, (process_index + 1) * b)
        batches = memory_batches(images, labels, seed, batch_size, rows, start_step, with_index)
    else:
        source = open_source(config, "train")
        n = len(keep) if keep is not None else len(source)
        if n < batch_size:
            raise ValueError(f"batch_size={batch_size} > {n} labelled train examples.")
        size = config.data.image_size
        side, fraction = (
            (config.data.host_size or size, 1.0)
            if augment
            else (size, EVAL_CROP_FRACTION.get(config.dataset, 1.0))
        )
        batches = Stream(
            config,
            source,
            TrainPlan(seed, n, batch_size, process_index * b, b, keep),
            decoder("centre", side, fraction=fraction),
            start_step=start_step,
            with_index=with_index,
            max_bad_fraction=max_bad_fraction(config),
        )
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
    with `b = batch_size // process_count`. Host p reads examples p, p + process_count, ... of
    the split; every host yields the same number of batches, padded with mask False (an
    undecodable image is masked out too, with a warning naming it). With several processes
    the consumer calls `runtime.loop.finish_eval_stream` after the pass: too many bad files
    stop every process there with the same line. A text dataset gives 'tokens' int32
    [b, model.max_len] instead of 'image'.
    """
    _split_name(split)
    dataset_name(config)
    process_index, process_count, b = _hosts(batch_size, process_index, process_count)
    if _is_text(config):
        total = labelled_size(config, split, max_examples=max_examples)
        return text_eval_batches(config, split, b, total, process_index, process_count)
    _check_labelled(config, split)
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
    fraction = EVAL_CROP_FRACTION.get(config.dataset, 1.0)  # cifar: the whole 32 px image
    batches = Stream(
        config,
        open_source(config, split),
        EvalPlan(np.arange(total)[process_index::process_count], b),
        decoder("centre", size, fraction=fraction),
        num_steps=num_batches,
        with_mask=True,
        max_bad_fraction=max_bad_fraction(config),
    )
    # Several processes decide on the summed counts after the pass (`loop.finish_eval_stream`):
    # one stopping alone mid-pass would leave the others in their next collective.
    batches.stats.decide_locally = process_count == 1
    return batches, num_batches
