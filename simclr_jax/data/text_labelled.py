"""Labelled text streams for the downstream jobs: token ids and class labels, in the image order.

The same contracts as the image streams of `labelled` (which dispatches here for a text dataset):
train batches follow `streams.batch_indices` over the train split or a label subset (`keep`),
host p rows [p*b, (p+1)*b), resumable in O(1); eval batches visit every example of a split once,
host p examples p, p + P, ..., padded with 'mask' False. Splits are the dataset's own names:
train = `data.text_split`, test = `data.text_test_split` (GLUE's labelled 'validation'; the
bundled 'polarity' names its held-out 40 'validation' or 'test'). Texts are encoded with
`data.tokenizer` (the encoder's tokenizer.json, set by the job) at `model.max_len` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from simclr_jax.data.datasets import Batch
from simclr_jax.data.plans import EvalPlan, TrainPlan
from simclr_jax.data.text import TextStream
from simclr_jax.data.text_sources import TextSource, open_text_source
from simclr_jax.data.tokenizer import encode, load_for

if TYPE_CHECKING:
    import ml_collections
    import tokenizers

_LABELS_CHUNK = 4096  # examples read at a time for the train split's labels
_LABELLED_HINT = (
    "the downstream jobs need class labels: dataset='polarity', 'tfds_text' with a ClassLabel "
    "'label' (e.g. data.tfds_name='glue/sst2') or 'hf_text' with an integer 'label' column"
)


def split_name(config: ml_collections.ConfigDict, split: str) -> str:
    """The dataset's own name of the labelled 'train' / 'test' split."""
    return config.data.text_split if split == "train" else config.data.text_test_split


def labelled_source(config: ml_collections.ConfigDict, split: str) -> TextSource:
    """The labelled 'train' or 'test' split as a source; ValueError if it has no class labels."""
    name = split_name(config, split)
    source = open_text_source(config, name)
    if not source.labelled:
        what = (
            f" (data.tfds_name={config.data.tfds_name!r})" if config.dataset == "tfds_text" else ""
        )
        raise ValueError(
            f"config.dataset={config.dataset!r}{what} has no class labels in split {name!r}; "
            f"{_LABELLED_HINT}."
        )
    return source


def load_tokenizer(config: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
    """The tokenizer at `config.data.tokenizer`, checked against `model.vocab_size`."""
    path = config.data.tokenizer
    if not path:
        raise ValueError(
            "config.data.tokenizer is empty: set it to the encoder's tokenizer.json (the "
            "linear_eval / finetune jobs set it to the one beside the export or checkpoint)."
        )
    return load_for(path, int(config.model.vocab_size))


def text_size(config: ml_collections.ConfigDict, split: str, keep: np.ndarray | None = None) -> int:
    """Examples of the labelled split (train: of `keep` when given)."""
    source = labelled_source(config, split)  # refuses an unlabelled split
    return len(keep) if split == "train" and keep is not None else len(source)


def text_train_labels(config: ml_collections.ConfigDict) -> np.ndarray:
    """int32 labels of the labelled train split in its fixed order."""
    source = labelled_source(config, "train")
    chunks = [
        source.read(np.arange(i, min(i + _LABELS_CHUNK, len(source))))[1]
        for i in range(0, len(source), _LABELS_CHUNK)
    ]
    return np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)


class _LabelledTextStream(TextStream):
    """`TextStream` without the word ids: {'tokens', 'label'[, 'index']}."""

    def __next__(self) -> Batch:
        batch = super().__next__()
        del batch["words"]  # for span augmentations; a classifier reads tokens only
        return batch


def text_train_iterator(
    config: ml_collections.ConfigDict,
    batch_size: int,
    *,
    keep: np.ndarray | None,
    seed: int,
    first_row: int,
    rows: int,
    start_step: int,
    with_index: bool,
) -> TextStream:
    """Endless host batches {'tokens': int32 [rows, max_len], 'label': int32 [rows]} from
    `start_step`: rows [first_row, first_row + rows) of `batch_indices(seed, n, batch_size, t)`
    over the train split or `keep`."""
    source = labelled_source(config, "train")
    tok = load_tokenizer(config)
    n = len(keep) if keep is not None else len(source)
    if n < batch_size:
        raise ValueError(f"batch_size={batch_size} > {n} labelled train examples.")
    plan = TrainPlan(seed, n, batch_size, first_row, rows, keep)
    return _LabelledTextStream(
        source,
        tok,
        plan,
        int(config.model.max_len),
        start_step=start_step,
        with_index=with_index,
    )


def text_eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    rows: int,
    total: int,
    process_index: int,
    process_count: int,
) -> tuple[Iterator[Batch], int]:
    """(this host's batches of the first `total` examples of a labelled split, their count).

    {'tokens': int32 [rows, max_len], 'label': int32 [rows], 'mask': bool [rows]}; host p reads
    examples p, p + P, ...; padding rows hold [CLS] [SEP] (finite features) with mask False.
    """
    source = labelled_source(config, split)
    tok = load_tokenizer(config)
    max_len = int(config.model.max_len)
    per_host = -(-total // process_count)
    num_batches = -(-per_host // rows)
    plan = EvalPlan(np.arange(total)[process_index::process_count], rows)

    def batches() -> Iterator[Batch]:
        for step in range(num_batches):
            index, _ = plan.rows(step)
            mask = index >= 0
            texts, labels = source.read(index[mask])
            padded = list(texts) + [""] * int((~mask).sum())
            tokens, _, _ = encode(tok, padded, max_len)
            label = np.zeros(rows, np.int32)
            label[: len(labels)] = labels
            yield {"tokens": tokens, "label": label, "mask": mask}

    return batches(), num_batches
