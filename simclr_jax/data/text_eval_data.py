"""Evaluation texts: sentence-similarity pairs with human scores, and labelled sentences to probe.

Two offline sets bundled with gensim's test data (found without importing gensim) and two GLUE
tasks from tfds (prepared beforehand; never downloaded):

* `sts_pairs`: 'stsb' = GLUE STS-B (validation: its test labels are hidden), 'lee' = the Lee
  corpus' 50 documents (`lee.cor`) with the mean human similarity ratings of its 1225 pairs
  (`similarities0-1.txt`, 50 x 50 upper triangle, in [0, 1]).
* `probe_texts`: 'sst2' = GLUE SST-2 (train / validation), 'polarity' = Pang & Lee's 200
  sentences (`pang_lee_polarity.cor`, 100 positive, 100 negative) split 160 / 40 per class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from simclr_jax.data.datasets import DatasetNotAvailableError, import_tfds
from simclr_jax.data.text_sources import (  # noqa: F401  (polarity, constants re-exported)
    GENSIM_TEXT_ENCODING,
    POLARITY_TEST_PER_CLASS,
    as_str,
    gensim_file,
    polarity,
    read_lines,
)

if TYPE_CHECKING:
    import ml_collections

STS_TASKS = ("stsb", "lee")
PROBE_TASKS = ("sst2", "polarity")
# Split read when none is given: the labelled held-out one.
STS_SPLITS = {"stsb": ("validation", "train"), "lee": ("test",)}
PROBE_SPLITS = {"sst2": ("train", "validation"), "polarity": ("train", "test", "all")}


def _check(kind: str, task: str, tasks: tuple[str, ...], split: str, splits: tuple) -> None:
    """ValueError naming the task or split and what is allowed."""
    if task not in tasks:
        raise ValueError(f"unknown {kind} task {task!r}; allowed: {', '.join(tasks)}.")
    if split not in splits:
        raise ValueError(
            f"{kind} task {task!r} has no labelled split {split!r}; allowed: {', '.join(splits)}."
        )


def sts_pairs(
    config: ml_collections.ConfigDict, task: str, split: str | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, float32 human similarity scores) of an STS task.

    `split` None: 'validation' for stsb (scores 0..5), 'test' for lee (the only one, [0, 1]).
    """
    split = split or STS_SPLITS.get(task, ("",))[0]
    _check("sts", task, STS_TASKS, split, STS_SPLITS.get(task, ()))
    if task == "lee":
        return lee_pairs()
    records = tfds_records("glue/stsb", split, config.data.data_dir or None)
    first = [as_str(r["sentence1"]) for r in records]
    second = [as_str(r["sentence2"]) for r in records]
    return first, second, np.array([float(r["label"]) for r in records], np.float32)


def lee_pairs() -> tuple[list[str], list[str], np.ndarray]:
    """The 1225 pairs i < j of the 50 Lee documents, in row-major order, with their ratings."""
    docs = read_lines(gensim_file("lee.cor"), GENSIM_TEXT_ENCODING)
    scores = np.loadtxt(gensim_file("similarities0-1.txt"), dtype=np.float32)
    if len(docs) != 50 or scores.shape != (50, 50):
        raise DatasetNotAvailableError(
            f"gensim's lee.cor / similarities0-1.txt hold {len(docs)} documents and a "
            f"{scores.shape} matrix; expected 50 and (50, 50)."
        )
    i, j = np.triu_indices(len(docs), k=1)
    return [docs[a] for a in i], [docs[b] for b in j], scores[i, j]


def probe_texts(
    config: ml_collections.ConfigDict, task: str, split: str
) -> tuple[list[str], np.ndarray]:
    """(sentences, int32 labels) of a split of a sentence-classification task.

    sst2: 'train' (67,349) or 'validation' (872), labels 0 negative / 1 positive. polarity:
    'train' (160), 'test' (40) or 'all' (200, for cross-validation), the same labels.
    """
    _check("probe", task, PROBE_TASKS, split, PROBE_SPLITS.get(task, ()))
    if task == "polarity":
        return polarity(split)
    records = tfds_records("glue/sst2", split, config.data.data_dir or None)
    texts = [as_str(r["sentence"]) for r in records]
    return texts, np.array([int(r["label"]) for r in records], np.int32)


def tfds_records(name: str, split: str, data_dir: str | None) -> list[dict[str, Any]]:
    """Every record of a small tfds split as a dict of numpy values (ArrayRecord or TFRecord)."""
    tfds = import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    try:  # random access: ArrayRecord, and tfds.testing.mock_data
        source = tfds.data_source(name, split=split, data_dir=data_dir)
        return [source[i] for i in range(len(source))]
    except Exception:  # noqa: BLE001  (prepared as TFRecord, or not at all: tried below)
        pass
    if not builder.is_prepared():
        dir_flag = f" --data_dir={data_dir}" if data_dir else ""
        raise DatasetNotAvailableError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir} and is never downloaded "
            f"implicitly. On a machine with internet access run `tfds build {name}{dir_flag}` and "
            "copy the data directory here (or set config.data.data_dir)."
        )
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return [
        {k: v[i] for k, v in batch.items()}
        for batch in ds.batch(1024).as_numpy_iterator()
        for i in range(len(next(iter(batch.values()))))
    ]
