"""Random-access sources of text examples: line files, the bundled Lee corpus, tfds, HF datasets.

A source maps a split index to its text (and label) in O(1), so a stream starts at any step
without reading what came before. Text files are indexed once by the byte offset of each
non-blank line (8 bytes a line are held, never the text); tfds text datasets are read with
`tfds.data_source` (ArrayRecord), Hugging Face datasets from local files (Arrow, memory-mapped).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from simclr_jax.data.datasets import DatasetNotAvailableError, import_tfds

if TYPE_CHECKING:
    import ml_collections

log = logging.getLogger(__name__)

TEXT_INSTALL = "pip install -r requirements-text.txt"
# gensim's test data: the Lee corpus (Lee, Pincombe & Welsh 2005) and Pang & Lee's sentence
# polarity sample, read as files; gensim itself is never imported (slow, and not needed).
GENSIM_DATA = "test/test_data"
LEE_BACKGROUND = "lee_background.cor"  # 300 news articles, one a line: pretraining text
# gensim's lee.cor and pang_lee_polarity.cor are Windows-1252 ('£', '—', 'é'), not UTF-8.
GENSIM_TEXT_ENCODING = "cp1252"
POLARITY_TEST_PER_CLASS = 20  # of each class's 100 sentences: 160 train / 40 test
_POLARITY_LABELS = {"__label__neg": 0, "__label__pos": 1}
# The 'polarity' dataset's splits ('validation': the held-out 40, as GLUE names its eval split).
POLARITY_SPLITS = {"train": "train", "validation": "test", "test": "test", "all": "all"}
# A sentence ends at '.', '!' or '?' (or one followed by a closing quote) before whitespace
# and a capital letter (or a quote and a capital): "Mr. Smith" splits wrongly, rarely enough.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"']?[A-Z])")
_INDEX_CHUNK = 8 << 20  # bytes of a text file scanned at a time while indexing its lines
# A blank line (also the empty "line" after a chunk's last break): ASCII whitespace only.
_BLANK_LINE = re.compile(rb"^[ \t\r\x0b\x0c]*$", re.MULTILINE)
_HF_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_HF_BUILDERS[".parquet"] = "parquet"


class TextSource(Protocol):
    """A split as a random-access sequence of texts with int32 labels (-1: unlabelled)."""

    num_classes: int  # 1 when unlabelled (the online linear head needs one output)
    labelled: bool  # whether the split has class labels (else every label is -1)

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(texts, int32 labels) of split indices."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class ListSource:
    """Texts held in memory (a small corpus)."""

    texts: list[str]
    labels: np.ndarray | None = None
    num_classes: int = 1

    @property
    def labelled(self) -> bool:
        """Whether the texts have class labels."""
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.texts)

    def read(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The texts and labels (-1 where unlabelled)."""
        texts = [self.texts[i] for i in indices.tolist()]
        if self.labels is None:
            return texts, np.full(len(texts), -1, np.int32)
        return texts, self.labels[indices].astype(np.int32)


class LineFileSource:
    """The non-blank lines of text files, one example each, in file then line order."""

    num_classes = 1
    labelled = False

    def __init__(self, files: list[str]):
        self.files = files
        self._starts = [line_index(f) for f in files]
        self._ends = np.cumsum([len(s) for s in self._starts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def read(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The lines (without their line break); labels -1."""
        file_of = np.searchsorted(self._ends, indices, side="right")
        texts: list[str] = [""] * len(indices)
        for f in np.unique(file_of):  # each file opened once per call
            rows = np.flatnonzero(file_of == f)
            first = int(self._ends[f - 1]) if f else 0
            with open(self.files[f], "rb") as handle:
                for row in rows:
                    start = int(self._starts[f][indices[row] - first])
                    handle.seek(start)
                    line = handle.readline().decode("utf-8").rstrip("\r\n")
                    # A file's first line may open with a UTF-8 byte-order mark.
                    texts[row] = line.removeprefix("\ufeff") if start == 0 else line
        return texts, np.full(len(indices), -1, np.int32)


def line_index(path: str) -> np.ndarray:
    """Byte offsets (int64) of the non-blank lines of a UTF-8 text file; cached per version."""
    stat = os.stat(path)
    return _line_index(path, stat.st_size, stat.st_mtime_ns)


# Unbounded: a corpus of many files is opened several times per run (its size, the tokenizer's
# texts, the stream), and a source holds every file's offsets anyway.
@functools.cache
def _line_index(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """`line_index` of one version of a file (size and mtime are the cache key)."""
    del size, mtime_ns
    starts, offset, lines = [], 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_INDEX_CHUNK):
            if not chunk.endswith(b"\n"):
                chunk += f.readline()  # whole lines in every chunk
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                line = lines + chunk.count(b"\n", 0, e.start) + 1
                raise ValueError(
                    f"{path}: line {line} is not UTF-8 (byte {offset + e.start}: {e.reason}); "
                    "text files must be UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            breaks = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
            first = np.concatenate([[0], breaks + 1])  # ends with len(chunk): no line
            # The regex engine finds blank lines ~6x faster than a numpy pass over every byte.
            blank = np.fromiter((m.start() for m in _BLANK_LINE.finditer(chunk)), np.int64)
            starts.append(offset + first[~np.isin(first, blank, assume_unique=True)])
            offset, lines = offset + len(chunk), lines + len(breaks)
    index = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
    index.setflags(write=False)  # cached and shared
    return index


def text_files(spec: str | None) -> list[str]:
    """The files of config.data.text_files: a file, a glob, or a folder's *.txt, sorted."""
    if not spec:
        raise DatasetNotAvailableError(
            "text_file: set config.data.text_files to a text file, a glob or a folder of *.txt "
            "files (one example per line)."
        )
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(glob.escape(spec), "*.txt")))
        if not files:
            raise DatasetNotAvailableError(f"text_file: no *.txt file in the folder {spec}.")
    elif os.path.isfile(spec):
        files = [spec]
    elif glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
        if not files:
            raise DatasetNotAvailableError(f"text_file: no file matches {spec!r}.")
    else:
        raise DatasetNotAvailableError(f"text_file: {spec} does not exist.")
    nonempty = [f for f in files if len(line_index(f))]
    if not nonempty:
        what = files[0] if len(files) == 1 else f"every one of the {len(files)} files of {spec}"
        raise ValueError(f"text_file: {what} has no non-blank line (one example per line).")
    if len(nonempty) < len(files):
        log.warning("text_file: %d empty files skipped", len(files) - len(nonempty))
    return nonempty


def gensim_file(name: str) -> str:
    """The path of one of gensim's bundled test-data files, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotAvailableError(
            f"the bundled text data ({name}) ships with the gensim package, which is not "
            f"installed: {TEXT_INSTALL}"
        )
    path = os.path.join(spec.submodule_search_locations[0], GENSIM_DATA, name)
    if not os.path.isfile(path):
        raise DatasetNotAvailableError(f"{path} is missing from this gensim installation.")
    return path


def read_lines(path: str, encoding: str = "utf-8") -> list[str]:
    """The non-blank lines of a small file, stripped."""
    with open(path, encoding=encoding) as f:
        return [line.strip() for line in f if line.strip()]


def split_sentences(text: str) -> list[str]:
    """`text` cut after '.', '!' or '?' followed by a space and a capital (`_SENTENCE_END`)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@functools.cache
def lee_news_sentences() -> tuple[str, ...]:
    """The sentences of gensim's lee_background.cor (300 news articles), in order."""
    articles = read_lines(gensim_file(LEE_BACKGROUND))
    return tuple(s for article in articles for s in split_sentences(article))


def polarity(split: str) -> tuple[list[str], np.ndarray]:
    """Pang & Lee's 200 sentences: 'all' in file order, or a fixed stratified 160 / 40 split.

    The last POLARITY_TEST_PER_CLASS of each class in a permutation seeded 0 are 'test'.
    """
    texts, labels = [], []
    for line in read_lines(gensim_file("pang_lee_polarity.cor"), GENSIM_TEXT_ENCODING):
        tag, _, text = line.partition(" ")
        if tag not in _POLARITY_LABELS:
            raise DatasetNotAvailableError(f"pang_lee_polarity.cor: unexpected line {line!r}.")
        texts.append(text.strip())
        labels.append(_POLARITY_LABELS[tag])
    labels = np.array(labels, np.int32)
    if split == "all":
        return texts, labels
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[-POLARITY_TEST_PER_CLASS:]] = True
    keep = np.flatnonzero(test if split == "test" else ~test)
    return [texts[i] for i in keep], labels[keep]


class TfdsTextSource:
    """A tfds text split read by random access (`tfds.data_source`, ArrayRecord)."""

    def __init__(self, name: str, split: str, field: str, data_dir: str | None):
        tfds = import_tfds()
        self.name, self.field = name, field
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001  (tfds' unknown-name error is pages long)
            raise DatasetNotAvailableError(f"tfds_text: unknown tfds dataset {name!r}.") from e
        features = builder.info.features
        if field not in features:
            raise ValueError(
                f"tfds_text: {name} has no feature data.text_field={field!r}; it has "
                f"{sorted(features.keys())}."
            )
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001  (not prepared, or not as ArrayRecord)
            dir_flag = f" --data_dir={data_dir}" if data_dir else ""
            raise DatasetNotAvailableError(
                f"tfds_text: {name} split {split!r} cannot be read by random access from "
                f"{builder.data_dir} ({type(e).__name__}). Prepare it as ArrayRecord on a "
                f"machine with internet access: `tfds build {name}{dir_flag} "
                "--file_format=array_record`, and copy the data directory here."
            ) from None
        # Labels are class ids only (a ClassLabel); stsb's float scores are no classes.
        classes = getattr(features["label"], "num_classes", None) if "label" in features else None
        self.labelled = bool(classes)
        self.num_classes = int(classes or 1)

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The texts and labels (-1 where the dataset has none)."""
        records = [self._source[i] for i in indices.tolist()]
        texts = [as_str(r[self.field]) for r in records]
        if not self.labelled:
            return texts, np.full(len(texts), -1, np.int32)
        return texts, np.array([int(r["label"]) for r in records], np.int32)


def as_str(value: Any) -> str:
    """A text feature as str (tfds gives bytes or str, numpy scalars or not)."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class HfTextSource:
    """A Hugging Face `datasets` split from local files: a `save_to_disk` folder or a data file."""

    def __init__(self, path: str | None, split: str, field: str):
        ds = load_hf(path, split)
        if path and os.path.splitext(path)[1].lower() == ".txt":
            field = "text"  # the 'text' builder's one column
        if field not in ds.column_names:
            raise ValueError(
                f"hf_text: {path} has no column data.text_field={field!r}; it has "
                f"{ds.column_names}."
            )
        self._ds, self.field = ds, field
        self._labels: np.ndarray | None = None
        self.num_classes, self.labelled = 1, False
        if "label" in ds.column_names:
            labels = np.asarray(ds["label"])
            if np.issubdtype(labels.dtype, np.integer):
                self._labels, self.labelled = labels.astype(np.int32), True
                feature = ds.features["label"]
                self.num_classes = int(getattr(feature, "num_classes", 0) or labels.max() + 1)

    def __len__(self) -> int:
        return len(self._ds)

    def read(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The texts and labels (-1 where the dataset has no integer 'label' column)."""
        texts = [as_str(t) for t in self._ds[indices.tolist()][self.field]]
        if self._labels is None:
            return texts, np.full(len(texts), -1, np.int32)
        return texts, self._labels[indices]


def load_hf(path: str | None, split: str) -> Any:
    """The `datasets.Dataset` at `path` (a save_to_disk folder: its `split` if it holds several)."""
    if not path or not os.path.exists(path):
        raise DatasetNotAvailableError(f"hf_text: config.data.hf_path={path!r} does not exist.")
    try:
        import datasets
    except ImportError:
        raise DatasetNotAvailableError(
            f"hf_text needs the Hugging Face `datasets` package: {TEXT_INSTALL}"
        ) from None
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"hf_text: {path} has no split data.text_split={split!r}; it has {list(ds)}."
                )
            ds = ds[split]
        return ds
    builder = _HF_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise ValueError(
            f"hf_text: {path} is neither a save_to_disk folder nor a data file "
            f"({', '.join(_HF_BUILDERS)})."
        )
    return datasets.load_dataset(builder, data_files=path, split="train")


def open_text_source(config: ml_collections.ConfigDict, split: str | None = None) -> TextSource:
    """A split of config.dataset (a text dataset) as a random-access source.

    `split`: the dataset's own split name; None: the pretraining split, `data.text_split`.
    """
    name, d = config.dataset, config.data
    split = d.text_split if split is None else split
    if name == "text_file":
        return LineFileSource(text_files(d.text_files))
    if name == "lee_news":
        return ListSource(list(lee_news_sentences()))
    if name == "polarity":
        if split not in POLARITY_SPLITS:
            raise ValueError(
                f"polarity has no split {split!r}; allowed: {', '.join(POLARITY_SPLITS)}."
            )
        texts, labels = polarity(POLARITY_SPLITS[split])
        return ListSource(texts, labels, len(_POLARITY_LABELS))
    if name == "tfds_text":
        if not d.tfds_name:
            raise DatasetNotAvailableError("tfds_text: set config.data.tfds_name (e.g. glue/sst2).")
        return TfdsTextSource(d.tfds_name, split, d.text_field, d.data_dir or None)
    if name == "hf_text":
        return HfTextSource(d.hf_path, split, d.text_field)
    raise ValueError(f"config.dataset={name!r} is not a text dataset.")
