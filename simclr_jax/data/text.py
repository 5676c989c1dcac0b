"""The text pretraining stream: token ids of a text source, in the image streams' order.

The same input contract as images (`streams.batch_indices` through `plans.TrainPlan`): epoch e
a seeded permutation of the whole split, global batch t the next batch_size indices, host p rows
[p*b, (p+1)*b). A step's rows are read from a random-access source (`text_sources`) and encoded
with the run's tokenizer (`tokenizer.encode`) on the calling thread (or the Prefetcher's): O(b)
work at any step, so a resume starts in O(1) and the hosts of a step hold the one-host batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from simclr_jax.data.datasets import Batch, DatasetInfo
from simclr_jax.data.plans import TrainPlan
from simclr_jax.data.stats import StreamStats
from simclr_jax.data.text_sources import TextSource, open_text_source
from simclr_jax.data.tokenizer import encode, load_or_train

if TYPE_CHECKING:
    import ml_collections
    import tokenizers

log = logging.getLogger(__name__)

_TOKENIZER_CHUNK = 1024  # texts read at a time while training the tokenizer


@dataclasses.dataclass
class TextStats(StreamStats):
    """A text stream's counts: records read (`StreamStats`; none is ever bad) and truncated."""

    truncated: int = 0


class TextStream(Iterator[Batch]):
    """A host's batches of `plan` from `start_step`: {'tokens', 'words', 'label'[, 'index']}.

    tokens / words int32 [b, max_len] (`tokenizer.encode`), label int32 [b] (-1: unlabelled),
    index int32 [b] (split indices, `with_index`). `stats` counts the examples read and those
    longer than max_len tokens, which are truncated (logged once, with the count so far).
    """

    def __init__(
        self,
        source: TextSource,
        tok: tokenizers.Tokenizer,
        plan: TrainPlan,
        max_len: int,
        *,
        start_step: int = 0,
        with_index: bool = False,
    ):
        self.stats = TextStats()
        self._source, self._tok, self._plan, self._max_len = source, tok, plan, max_len
        self._step, self._with_index = start_step, with_index
        self._warned = False

    def __next__(self) -> Batch:
        index, _ = self._plan.rows(self._step)
        texts, labels = self._source.read(index)
        tokens, words, truncated = encode(self._tok, texts, self._max_len)
        self.stats.read += len(texts)
        self.stats.truncated += truncated
        if truncated and not self._warned:
            self._warned = True
            log.warning(
                "text: %d of the %d examples read so far (step %d) have more than "
                "model.max_len=%d tokens with [CLS] and [SEP] and were truncated; later ones "
                "are counted in the stream's stats.truncated, not logged.",
                self.stats.truncated,
                self.stats.read,
                self._step,
                self._max_len,
            )
        batch = {"tokens": tokens, "words": words, "label": labels.astype(np.int32)}
        if self._with_index:
            batch["index"] = index.astype(np.int32)
        self._step += 1
        self.stats.batch_done()
        return batch

    def close(self) -> None:
        """Nothing to stop (no threads, no open files); for the Prefetcher's protocol."""


def text_iterator(
    config: ml_collections.ConfigDict,
    tok: tokenizers.Tokenizer,
    *,
    process_index: int,
    batch: int,
    start_step: int,
    with_index: bool = False,
) -> TextStream:
    """This host's endless text batches from global step `start_step` (the image contract).

    Rows [p*b, (p+1)*b) of global batch t = `streams.batch_indices(seed, n, batch_size, t)`,
    p = `process_index`, b = `batch` (the host's share, checked by `data.pretrain_iterator`,
    the public entry), each example `config.model.max_len` token ids.
    """
    source = open_text_source(config)
    if len(source) < config.batch_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} > {len(source)} {config.dataset} examples."
        )
    plan = TrainPlan(config.seed, len(source), config.batch_size, process_index * batch, batch)
    return TextStream(
        source,
        tok,
        plan,
        int(config.model.max_len),
        start_step=start_step,
        with_index=with_index,
    )


def training_texts(config: ml_collections.ConfigDict) -> Iterator[str]:
    """The pretraining split's texts that train the tokenizer, in split order.

    All of them, or with `config.data.tokenizer_train_examples = k > 0` k of them evenly spaced
    over the split (a large corpus: every file and part contributes).
    """
    source = open_text_source(config)
    n, k = len(source), int(config.data.tokenizer_train_examples)
    indices = np.arange(n) if not k or k >= n else np.linspace(0, n - 1, k).astype(np.int64)
    for start in range(0, len(indices), _TOKENIZER_CHUNK):
        yield from source.read(indices[start : start + _TOKENIZER_CHUNK])[0]


def load_or_train_tokenizer(
    config: ml_collections.ConfigDict, workdir: str
) -> tokenizers.Tokenizer:
    """WORKDIR/tokenizer.json, trained on `training_texts(config)` the first time."""
    return load_or_train(config, workdir, lambda: training_texts(config))


def text_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Sizes of a text dataset: examples of the pretraining split; image_size 0, no test split.

    num_classes: the label feature's classes (sst2: 2), or 1 when unlabelled (the online linear
    head needs an output; every label is -1 and it learns nothing).
    """
    source = open_text_source(config)
    return DatasetInfo(config.dataset, source.num_classes, len(source), 0, 0)
