"""Random-access sources of encoded images: image folders by file index, tfds ArrayRecord files.

A source maps a split index to its record in O(1), so a stream can start at any step without
reading what came before. tfds datasets must be prepared (or converted) as ArrayRecord; one
prepared only as TFRecord is refused with the command that converts it (`data.convert`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from simclr_jax.data.datasets import (
    TFDS_SPLITS,
    DatasetNotAvailableError,
    folder_splits,
    import_tf,
    import_tfds,
    tfds_builder,
)

if TYPE_CHECKING:
    import ml_collections

# The format tfds serves by random access that this pipeline reads (records are tf.Examples).
RANDOM_ACCESS_FORMAT = "array_record"


class Source(Protocol):
    """A split as a random-access sequence of records."""

    # True: records are serialized tf.Examples ('image', 'label') that the decoder parses;
    # False: records are encoded images and `read` also returns their labels.
    serialized: bool
    # True: `read` gives file paths, which the pipeline reads with TF (`fetch` reads one here).
    paths: bool

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[list[Any], np.ndarray | None]:
        """(records or paths, int32 labels or None when serialized) of split indices."""
        ...

    def fetch(self, index: int) -> bytes:
        """The record (file bytes) at `index`, read here."""
        ...

    def describe(self, index: int) -> str:
        """A name for the record at `index` that a user can find (a path, a file name)."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource:
    """Image files by index: `paths[i]` holds example i, labelled `labels[i]`."""

    files: np.ndarray
    labels: np.ndarray
    serialized = False
    # TF reads the files (`tf.io.read_file` in the decode stage): reading them in Python and
    # handing the bytes to tf.data cost ~40 us more CPU per 100 KB image.
    paths = True

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: np.ndarray) -> tuple[list[Any], np.ndarray | None]:
        """The files' paths and labels."""
        return list(self.files[indices]), self.labels[indices]

    def fetch(self, index: int) -> bytes:
        """The file's bytes."""
        with open(self.files[index], "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        """The file's path."""
        return str(self.files[index])


class TfdsSource:
    """A tfds split ('unlabelled+train': its parts one after the other) read from ArrayRecord."""

    paths = False

    def __init__(self, builder: Any, split: str, dataset: str):
        tfds = import_tfds()
        self.dataset, self.split = dataset, split
        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        self._parts = [
            builder.as_data_source(part, deserialize_method=raw, file_format=RANDOM_ACCESS_FORMAT)
            if builder.is_prepared()
            # tfds.testing.mock_data: its sources yield decoded dicts (no files to read raw).
            else builder.as_data_source(part, decoders={"image": tfds.decode.SkipDecoding()})
            for part in split.split("+")
        ]
        self.serialized = builder.is_prepared()
        # The ArrayRecord reader under tfds's wrapper: the same bytes, ~12 us less per record.
        self._readers = [
            getattr(p, "data_source", p) if self.serialized else p for p in self._parts
        ]
        self._ends = np.cumsum([len(p) for p in self._parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _record(self, index: int) -> Any:
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self._readers[part][int(index) - start]

    def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray | None]:
        """Serialized tf.Examples (labels None), or under mock_data image bytes and labels."""
        if len(self._readers) == 1:
            # One record at a time: `__getitems__` measured 3x slower per record for a chunk.
            reader = self._readers[0]
            records = [reader[i] for i in indices.tolist()]
        else:
            records = [self._record(i) for i in indices]
        if self.serialized:
            return records, None
        labels = np.array([r.get("label", -1) for r in records], np.int32).reshape(-1)
        return [r["image"] for r in records], labels

    def fetch(self, index: int) -> bytes:
        """The record at `index` (a serialized tf.Example, or under mock_data the image)."""
        record = self._record(index)
        return record if self.serialized else record["image"]

    def describe(self, index: int) -> str:
        """'imagenet2012 train[12] (n01440764_10026.JPEG)' (the file name where stored)."""
        name = f"{self.dataset} {self.split}[{index}]"
        if not self.serialized:
            return name
        tf = import_tf()
        try:
            feature = tf.train.Example.FromString(self._record(index)).features.feature
            file_name = feature["file_name"].bytes_list.value[0].decode()
        except Exception:  # noqa: BLE001  (a name is a courtesy; an unreadable record has none)
            return name
        return f"{name} ({file_name})"


def require_random_access(builder: Any, dataset: str) -> None:
    """Refuses, in one line naming the conversion command, a tfds dataset without ArrayRecord."""
    if not builder.is_prepared():  # mock_data: served from code, no files
        return
    info = builder.info
    formats = {f.value for f in info.available_file_formats()}
    if RANDOM_ACCESS_FORMAT in formats:
        return
    if RANDOM_ACCESS_FORMAT in info.as_proto.alternative_file_formats:
        # Converted in place (`data.convert`, `tfds convert_format`): tfds 4.9.10 restores the
        # alternative formats of dataset_info.json into its proto only, so as_data_source would
        # not see them.
        info.add_alternative_file_format(RANDOM_ACCESS_FORMAT)
        return
    raise DatasetNotAvailableError(
        f"Dataset {dataset!r} in {builder.data_dir} is prepared as {', '.join(sorted(formats))} "
        "only; the input pipeline reads ArrayRecord (random access, resumable at any step). "
        f"Convert it once, in place, keeping the TFRecord files: `python -m "
        f"simclr_jax.data.convert {builder.data_dir}` (or `tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record`, which needs "
        "apache-beam)."
    )


def open_source(config: ml_collections.ConfigDict, split: str) -> Source:
    """The random-access source of split 'pretrain', 'train' or 'test' of config.dataset."""
    if config.dataset == "image_folder":
        splits = folder_splits(config.data.folder)[1]
        paths, labels = splits["train" if split == "pretrain" else split]
        return FolderSource(paths, labels)
    builder = tfds_builder(config)
    require_random_access(builder, config.dataset)
    return TfdsSource(builder, TFDS_SPLITS[config.dataset][split], config.dataset)
