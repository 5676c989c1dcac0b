"""Label subsets as index lists on a split's source: SimCLR's official ImageNet 1% / 10%, files of
image names, and the labels a class-balanced fraction is drawn from.

Labels and file names are not in tfds metadata: they come from one pass over the split's records
(the image bytes are read but not decoded), kept in memory and in a cache file
(`~/.cache/simclr_jax/`, or `$XDG_CACHE_HOME`) so a later run reads them in a moment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from simclr_jax.data.datasets import (
    OFFICIAL_SUBSETS,
    DatasetNotAvailableError,
    folder_splits,
    import_tf,
    tfds_builder,
)
from simclr_jax.data.sources import TfdsSource, open_source

if TYPE_CHECKING:
    import ml_collections

log = logging.getLogger(__name__)

_CHUNK = 512  # records parsed per call during the metadata pass
# The official lists (google-research/simclr imagenet_subsets/), named in errors.
_OFFICIAL_FILES = {"1pct": "1percent.txt", "10pct": "10percent.txt"}


def split_metadata(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32 labels, file names) of a labelled split's examples in source order."""
    if config.dataset == "image_folder":
        paths, labels = folder_splits(config.data.folder)[1][split]
        return labels.copy(), np.array([os.path.basename(p) for p in paths])
    source = open_source(config, split)
    return _tfds_metadata(source, _cache_file(config, source))


def _cache_file(config: ml_collections.ConfigDict, source: TfdsSource) -> str | None:
    """Where a prepared split's metadata is cached (None under mock_data: nothing on disk)."""
    if not source.serialized:
        return None
    builder = tfds_builder(config)
    # The folder and when it was prepared: a dataset prepared again there gets a new cache.
    info = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns if os.path.exists(info) else 0
    key = hashlib.sha1(f"{builder.data_dir}:{stamp}".encode()).hexdigest()[:12]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = f"{source.dataset.replace('/', '_')}-{source.split}-{len(source)}-{key}.npz"
    return os.path.join(root, "simclr_jax", name)


_MEMORY: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # cache file -> its arrays, once read


def _tfds_metadata(source: TfdsSource, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and file names of every record of `source`: from memory, the cache file or a pass."""
    if cache in _MEMORY:
        return _MEMORY[cache]
    if cache and os.path.isfile(cache):
        with np.load(cache) as saved:
            _MEMORY[cache] = saved["labels"], saved["file_names"]
        return _MEMORY[cache]
    start = time.perf_counter()
    labels, names = [], []
    for first in range(0, len(source), _CHUNK):
        indices = np.arange(first, min(first + _CHUNK, len(source)))
        chunk_labels, chunk_names = _parse(source, indices)
        labels.append(chunk_labels)
        names.append(chunk_names)
    labels = np.concatenate(labels or [np.zeros(0, np.int32)])
    names = np.concatenate(names or [np.zeros(0, str)])
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        partial = f"{cache}.{os.getpid()}.partial.npz"
        np.savez(partial, labels=labels, file_names=names)
        os.replace(partial, cache)
        log.info(
            "read the labels and file names of %s %s (%d records) in %.0f s; cached in %s",
            source.dataset,
            source.split,
            len(labels),
            time.perf_counter() - start,
            cache,
        )
        _MEMORY[cache] = labels, names
    return labels, names


def _parse(source: TfdsSource, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, file names) of some records; the images are not decoded."""
    if not source.serialized:  # mock_data's dicts
        records = [source._record(i) for i in indices]
        labels = np.array([int(r.get("label", -1)) for r in records], np.int32)
        names = [r.get("file_name", b"") for r in records]
        return labels, np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names])
    tf = import_tf()
    records, _ = source.read(indices)
    parsed = tf.io.parse_example(
        tf.constant(records),
        {
            "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
            "file_name": tf.io.FixedLenFeature([], tf.string, default_value=""),
        },
    )
    names = [n.decode() for n in parsed["file_name"].numpy()]
    return parsed["label"].numpy().astype(np.int32), np.array(names)


def read_subset_file(path: str) -> set[str]:
    """Image file names (one a line, as google-research/simclr imagenet_subsets/*.txt)."""
    if not os.path.isfile(path):
        raise ValueError(
            f"config.finetune.subset={path!r} is neither an official subset "
            f"({', '.join(OFFICIAL_SUBSETS)}) nor a file of image names."
        )
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def official_subset_names(config: ml_collections.ConfigDict, subset: str) -> set[str]:
    """The image names of official subset '1pct' / '10pct', from its prepared tfds dataset."""
    official = config.copy_and_resolve_references()
    with official.unlocked():
        official.dataset = OFFICIAL_SUBSETS[subset]
    try:
        _, names = split_metadata(official, "train")
    except DatasetNotAvailableError:
        raise DatasetNotAvailableError(
            f"config.finetune.subset={subset!r} needs the names of its images: set "
            f"config.finetune.subset=PATH/{_OFFICIAL_FILES[subset]} (google-research/simclr "
            f"imagenet_subsets/{_OFFICIAL_FILES[subset]}), or prepare "
            f"{OFFICIAL_SUBSETS[subset]} with `tfds build` in config.data.data_dir."
        ) from None
    return set(names.tolist())


def subset_indices(config: ml_collections.ConfigDict, subset: str) -> np.ndarray | None:
    """Sorted train indices of the images a subset names (official or a file), or None (none)."""
    if not subset:
        return None
    if subset in OFFICIAL_SUBSETS:
        if config.dataset != "imagenet2012":
            raise ValueError(
                f"config.finetune.subset={subset!r} is an ImageNet subset; config.dataset is "
                f"{config.dataset!r}. Use finetune.label_fraction for other datasets."
            )
        names = official_subset_names(config, subset)
    else:
        names = read_subset_file(subset)
        if config.dataset not in ("image_folder", "imagenet2012"):
            raise ValueError(
                f"config.finetune.subset={subset!r} (a file of image names) needs "
                f"config.dataset='image_folder' or 'imagenet2012', not {config.dataset!r}."
            )
    _, file_names = split_metadata(config, "train")
    keep = np.flatnonzero(np.isin(file_names, list(names)))
    if not len(keep):
        raise ValueError(
            f"none of the {len(names)} images named by config.finetune.subset={subset!r} is in "
            f"the {config.dataset} train split."
        )
    return keep
