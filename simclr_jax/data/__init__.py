"""Host-side input pipeline: uint8 image batches, sliced per host, deterministic and resumable.

Every dataset gives the same guarantee (`streams.batch_indices`, the one definition of the order):
epoch e visits `np.random.default_rng([seed, e]).permutation(n)` of the whole split; global batch
t is the next `batch_size` indices of the concatenated epochs (each epoch's incomplete tail
dropped) and host p takes rows `[p*b, (p+1)*b)` of it. The hosts of a step together hold exactly
the single-host global batch, for any process count, and `start_step` resumes in O(1). Two paths,
picked by `config.dataset`:

* In memory (digits, cifar10, cifar100): the split is loaded once as a uint8 array and batches
  are indexed in numpy.
* Streamed (stl10, imagenet2012, image_folder): `pipeline.Stream` reads the step's records from a
  random-access source (`sources`: image files by index, tfds ArrayRecord) with Grain and decodes
  them with tf.data. Random crops use stateless ops seeded by the row's position in the global
  stream (step * batch_size + row), so neither parallel decoding nor the process count changes
  them. With host crops a JPEG is decoded once, inside the union of its two crop windows.

The modules below: `datasets` (names, sizes, arrays, builders, folders), `sources` (random-access
sources), `decode` (host crops), `streams` (epoch order, tf.data options, prefetching),
`pipeline` (the streamed stages), `stats` (skipped-record counts), `convert` (TFRecord to
ArrayRecord); `labelled` holds the downstream jobs' labelled streams. Text datasets
(`datasets.modality(name) == 'text'`) have their own: `text_sources` (line files, the bundled
Lee corpus, tfds, Hugging Face datasets), `tokenizer` (WordPiece, fixed-length ids), `text`
(the token-id stream, same order) and `text_eval_data` (STS pairs, probe sentences). The names
other modules use are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np

from simclr_jax.data.datasets import (  # noqa: F401  (re-exported: data.dataset_info etc.)
    DATASETS,
    EVAL_CROP_FRACTION,
    IN_MEMORY_DATASETS,
    STREAMED_DATASETS,
    TEXT_DATASETS,
    TFDS_SPLITS,
    Batch,
    DatasetInfo,
    DatasetNotAvailableError,
    dataset_name,
    folder_splits,
    import_tf,
    import_tfds,
    memory_arrays,
    modality,
    tfds_builder,
    tfds_num_examples,
)
from simclr_jax.data.datasets import dataset_info as _image_info
from simclr_jax.data.decode import (  # noqa: F401  (re-exported)
    crop_windows,
    decode_centre,
    decode_union_resized,
    decode_views,
    decoder,
    sample_crop_windows,
)
from simclr_jax.data.pipeline import (  # noqa: F401  (re-exported)
    MAX_BAD_FRACTION,
    BadDataError,
    EvalPlan,
    Prepare,
    Stream,
    StreamStats,
    TrainPlan,
    max_bad_fraction,
)
from simclr_jax.data.sources import open_source
from simclr_jax.data.streams import Prefetcher, host_seed, memory_batches
from simclr_jax.data.text import (  # noqa: F401  (re-exported)
    TextStats,
    load_or_train_tokenizer,
    text_info,
    text_iterator,
    training_texts,
)
from simclr_jax.data.text_eval_data import probe_texts, sts_pairs  # noqa: F401  (re-exported)
from simclr_jax.data.tokenizer import TOKENIZER_FILE  # noqa: F401  (re-exported)
from simclr_jax.data.tokenizer import load_for as load_tokenizer_for  # noqa: F401  (re-exported)
from simclr_jax.data.tokenizer import save as save_tokenizer  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import ml_collections
    import tokenizers


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class count and split sizes of config.dataset, image or text, from metadata."""
    if modality(dataset_name(config)) == "text":
        return text_info(config)
    return _image_info(config)


def _pretrain_prepare(config: ml_collections.ConfigDict) -> Prepare:
    """(encoded image, stream position) -> {'image'[, 'crop']}: the pretraining decode."""
    size, host_size = config.data.image_size, config.data.host_size
    if not config.data.host_crop:
        return decoder("centre", size)
    # Two independent crops of the original image, cut out here or (host_size) on device. One
    # crop seed for every host: a row's windows depend on its position in the global stream
    # only, so they do not change with the process count.
    seed = host_seed(config.seed, 0)
    if not host_size:
        return decoder("views", size, seed=seed)
    return decoder("union", size, host_size=host_size, seed=seed)


def _streamed_batches(
    config: ml_collections.ConfigDict,
    process_index: int,
    batch: int,
    step: int,
    with_index: bool = False,
) -> Stream:
    """This host's pretraining batches from a tfds dataset or image folder, from `step` on."""
    source = open_source(config, "pretrain")
    if len(source) < config.batch_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} > {len(source)} {config.dataset} examples."
        )
    plan = TrainPlan(config.seed, len(source), config.batch_size, process_index * batch, batch)
    return Stream(
        config,
        source,
        plan,
        _pretrain_prepare(config),
        start_step=step,
        with_index=with_index,
        max_bad_fraction=max_bad_fraction(config),
    )


def _streamed_arrays(
    config: ml_collections.ConfigDict, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-cropped eval images [N, S, S, 3] uint8 and labels [N] int32 of a streamed split."""
    source = open_source(config, split)
    n = min(len(source), config.data.eval_max_examples or len(source))
    size, fraction = config.data.image_size, EVAL_CROP_FRACTION[config.dataset]
    plan = EvalPlan(np.arange(n), 256)
    batches = list(
        Stream(
            config,
            source,
            plan,
            decoder("centre", size, fraction=fraction),
            num_steps=-(-n // plan.batch),
            with_mask=True,
            max_bad_fraction=max_bad_fraction(config),
        )
    )
    if not batches:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
    keep = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[keep]
    return images, np.concatenate([b["label"] for b in batches])[keep]


def pretrain_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    with_index: bool = False,
    tokenizer: tokenizers.Tokenizer | None = None,
) -> Iterator[Batch]:
    """This host's endless batches {'image': uint8 [b, S, S, 3], 'label': int32 [b]}.

    Rows [p*b, (p+1)*b) of every global batch from `start_step` on (the order in this module's
    docstring), `b = config.batch_size // process_count`: the first batch comes in O(1) at any
    step, and the hosts of a step hold exactly the one-host global batch.
    `with_index`: batches also carry 'index' int32 [b], each example's index in the training
    split (for a memory bank). With `config.data.host_crop` images are two host crops
    [b, 2, S, S, 3], or with `config.data.host_size = H` the union of the two crop windows
    [b, H, H, 3] plus the windows 'crop': float32 [b, 2, 4] (y, x, h, w in its pixels) that
    `augment.views` cuts out on device. Labels are -1 for unlabelled images. A streamed
    iterator's `stats` counts the records read and skipped as undecodable. Close the iterator
    (or drop it) to stop its threads. A text dataset (`modality(name) == 'text'`) needs the
    run's `tokenizer` and yields {'tokens', 'words': int32 [b, model.max_len], 'label'}
    (`text.text_iterator`, the same order; `stats` also counts truncated examples).
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
    if modality(name) == "text":
        if tokenizer is None:
            raise ValueError(
                f"config.dataset={name!r} is text: pretrain_iterator needs tokenizer= (the "
                "run's, data.load_or_train_tokenizer(config, workdir))."
            )
        batches = text_iterator(
            config,
            tokenizer,
            process_index=process_index,
            batch=batch,
            start_step=start_step,
            with_index=with_index,
        )
    elif name in IN_MEMORY_DATASETS:
        if config.data.host_crop or config.data.host_size:
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
        batches = _streamed_batches(config, process_index, batch, start_step, with_index)
    return Prefetcher(batches, config.data.prefetch) if config.data.prefetch > 0 else batches


def eval_arrays(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, S, S, 3] and labels int32 [N] of a labelled split, in a fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if modality(dataset_name(config)) == "text":
        raise ValueError(
            f"config.dataset={config.dataset!r} is text: its evaluation data are "
            "data.sts_pairs and data.probe_texts, not image arrays."
        )
    if dataset_name(config) in IN_MEMORY_DATASETS:
        return memory_arrays(config, split, config.data.eval_max_examples)
    return _streamed_arrays(config, split)
