"""Where the data lives: dataset names and sizes, in-memory arrays, tfds builders, image folders.

The lowest layer of the input pipeline (`data`, `labelled_data` and `decode` build on it).
TensorFlow is imported only where a tfds dataset or an image folder is read (the GPU image has
none), with its GPUs hidden. Datasets are never downloaded: a missing one raises
`DatasetNotAvailableError` saying how to prepare it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ml_collections


IN_MEMORY_DATASETS = ("digits", "cifar10", "cifar100")
STREAMED_DATASETS = ("stl10", "imagenet2012", "image_folder")
# Text (`data.text`): lines of text files, the Lee news sentences bundled with gensim, a tfds
# text dataset, a local Hugging Face dataset, Pang & Lee's labelled polarity sentences (gensim).
TEXT_DATASETS = ("text_file", "lee_news", "tfds_text", "hf_text", "polarity")
DATASETS = IN_MEMORY_DATASETS + STREAMED_DATASETS + TEXT_DATASETS
MODALITIES = ("image", "text")
# tfds split read for pretraining and for each labelled evaluation split.
TFDS_SPLITS = {
    "cifar10": {"pretrain": "train", "train": "train", "test": "test"},
    "cifar100": {"pretrain": "train", "train": "train", "test": "test"},
    "stl10": {"pretrain": "unlabelled+train", "train": "train", "test": "test"},
    "imagenet2012": {"pretrain": "train", "train": "train", "test": "validation"},
    # SimCLR's official 1% / 10% ImageNet label subsets (12,811 / 128,116 images of the train
    # split; google-research/simclr imagenet_subsets/), as tfds prepares them.
    "imagenet2012_subset/1pct": {"train": "train", "test": "validation"},
    "imagenet2012_subset/10pct": {"train": "train", "test": "validation"},
}
# config.finetune.subset names: the tfds builder that holds each official subset.
OFFICIAL_SUBSETS = {"1pct": "imagenet2012_subset/1pct", "10pct": "imagenet2012_subset/10pct"}
# Evaluation keeps this fraction of the shorter side around the centre (= resize the shorter side
# to S / 0.875, centre-crop S: the standard ImageNet protocol). STL-10 images are already framed.
EVAL_CROP_FRACTION = {"stl10": 1.0, "imagenet2012": 0.875, "image_folder": 0.875}
# Streamed tfds datasets are read by random access (`sources`): prepare them as ArrayRecord.
ARRAY_RECORD_FLAG = "--file_format=array_record"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_FOLDER_LAYOUT = (
    "Expected ROOT/train/<class>/*.jpg plus ROOT/test/<class>/*.jpg (or val/), or "
    "ROOT/<class>/*.jpg (then every 5th file of each class is the test split); jpg, jpeg or png."
)
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes of a dataset; `num_train_examples` counts the pretraining split (stl10: 105000)."""

    name: str
    num_classes: int
    num_train_examples: int
    num_test_examples: int
    image_size: int


class DatasetNotAvailableError(RuntimeError):
    """The dataset is not on this machine; the message says how to prepare it."""


def modality(name: str) -> str:
    """'text' for a text dataset, 'image' for an image one (ValueError for an unknown name)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; allowed: {', '.join(DATASETS)}.")
    return "text" if name in TEXT_DATASETS else "image"


def dataset_name(config: ml_collections.ConfigDict) -> str:
    """config.dataset, checked against the supported names."""
    if config.dataset not in DATASETS:
        raise ValueError(
            f"Unknown config.dataset {config.dataset!r}; allowed: {', '.join(DATASETS)}."
        )
    return config.dataset


@functools.cache
def import_tf() -> Any:
    """TensorFlow, imported on first use with its GPUs hidden (JAX owns the accelerators)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; too late to hide them, harmless.
        pass
    return tf


def import_tfds() -> Any:
    """tensorflow_datasets, imported after `import_tf` has hidden the GPUs."""
    import_tf()
    import tensorflow_datasets as tfds

    return tfds


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights with half-pixel centres and clamped edges."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), lo), 1 - (x - lo))
    np.add.at(weights, (np.arange(n_out), hi), x - lo)
    return weights


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize float [N, H, W, ...] to [N, size, size, ...] (upsampling: as jax.image.resize)."""
    rows = _bilinear_matrix(images.shape[1], size)
    cols = _bilinear_matrix(images.shape[2], size)
    images = np.einsum("ah,nhw...->naw...", rows, images, optimize=True)
    return np.einsum("bw,naw...->nab...", cols, images, optimize=True)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Round float pixel values in [0, 255] to uint8."""
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


@functools.cache
def digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1797 digits as RGB uint8 at `image_size`, split 1437/360 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = to_uint8(resize_bilinear(digits.images.astype(np.float32), image_size) * (255 / 16))
    images = np.repeat(gray[..., None], 3, axis=-1)
    split = train_test_split(
        images,
        digits.target.astype(np.int32),
        test_size=0.2,
        random_state=0,
        stratify=digits.target,
    )
    for array in split:
        array.setflags(write=False)  # cached and shared by every caller
    return {"train": (split[0], split[2]), "test": (split[1], split[3])}


def tfds_builder(config: ml_collections.ConfigDict) -> Any:
    """The tfds builder of config.dataset, or DatasetNotAvailableError if its data is missing."""
    tfds = import_tfds()
    name, data_dir = config.dataset, config.data.data_dir or None
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    try:  # tfds.testing.mock_data serves builders that report is_prepared() == False.
        builder.as_dataset(split=TFDS_SPLITS[name]["test"])
        return builder
    except AssertionError:
        pass
    if name == "imagenet2012":
        return _prepare_imagenet(builder, config.data.manual_dir)
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    fmt = "" if name in IN_MEMORY_DATASETS else f" {ARRAY_RECORD_FLAG}"
    raise DatasetNotAvailableError(
        f"Dataset {name!r} is not prepared in {builder.data_dir} and is never downloaded "
        f"implicitly. On a machine with internet access run `tfds build {name}{dir_flag}{fmt}` "
        f"(or `tfds build {name} --data_dir=DIR{fmt}`, then set config.data.data_dir=DIR) and "
        "copy the data directory here."
    )


def _prepare_imagenet(builder: Any, manual_dir: str | None) -> Any:
    """Build imagenet2012 from the tars in manual_dir (hours, once), or explain where they go."""
    missing = [
        t for t in _IMAGENET_TARS if not manual_dir or not os.path.isfile(f"{manual_dir}/{t}")
    ]
    if missing:
        raise DatasetNotAvailableError(
            f"Dataset 'imagenet2012' is not prepared in {builder.data_dir} and "
            f"config.data.manual_dir={manual_dir!r} lacks {', '.join(missing)}. ImageNet cannot "
            "be downloaded: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org/download-images, put both in a folder DIR and set "
            "config.data.manual_dir=DIR, or prepare it once beforehand (best for several hosts): "
            f"`tfds build imagenet2012 --manual_dir=DIR --data_dir=DATA_DIR {ARRAY_RECORD_FLAG}` "
            "and set config.data.data_dir=DATA_DIR."
        )
    tfds = import_tfds()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
        file_format="array_record",  # the streamed pipeline reads it by random access
    )
    return builder


def tfds_num_examples(builder: Any, split: str) -> int:
    """Examples in a tfds split such as 'unlabelled+train', from metadata (no read)."""
    if builder.info.splits:
        return sum(builder.info.splits[part].num_examples for part in split.split("+"))
    # mock_data: no split metadata, and every split (also 'a+b') holds its num_examples.
    return sum(int(builder.as_dataset(split=part).cardinality()) for part in split.split("+"))


def memory_arrays(
    config: ml_collections.ConfigDict, split: str, max_examples: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """All (or the first max_examples) images [N, S, S, 3] uint8 and labels [N] int32 of a split."""
    size = config.data.image_size
    if config.dataset == "digits":
        images, labels = digits_arrays(size)[split]
        return images[: max_examples or None].copy(), labels[: max_examples or None].copy()
    builder = tfds_builder(config)
    tfds_split = TFDS_SPLITS[config.dataset][split]
    formats = {f.value for f in builder.info.available_file_formats()}
    if builder.is_prepared() and "tfrecord" not in formats:
        # Prepared as ArrayRecord only (as the streamed datasets are): tfds serves it by random
        # access, not as tf.data.
        source = builder.as_data_source(tfds_split)
        examples = [source[i] for i in range(min(len(source), max_examples or len(source)))]
        images = np.stack([e["image"] for e in examples])
        labels = np.array([e["label"] for e in examples], np.int32)
    else:
        records = builder.as_dataset(split=tfds_split, shuffle_files=False)
        if max_examples:
            records = records.take(max_examples)
        # Batched reads: tfds' batch_size=-1 aborts the process under mock_data.
        batches = list(records.batch(1024).as_numpy_iterator())
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches]).astype(np.int32)
    if images.shape[1:3] != (size, size):
        images = to_uint8(resize_bilinear(images.astype(np.float32), size))
    return images, labels


def _image_files(directory: str, classes: list[str]) -> list[list[str]]:
    """Sorted image paths of each class sub-folder of `directory` (empty where it is missing)."""
    files = []
    for name in classes:
        folder = os.path.join(directory, name)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        files.append(
            [os.path.join(folder, f) for f in names if f.lower().endswith(_IMAGE_EXTENSIONS)]
        )
    return files


def _subfolders(directory: str) -> list[str]:
    """Sorted names of the sub-folders of `directory`."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir())


@functools.lru_cache(maxsize=8)
def folder_splits(root: str | None) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(class names, {'train'|'test': (paths, int32 labels)}) of an image folder, fixed order."""
    if not root or not os.path.isdir(root):
        raise DatasetNotAvailableError(
            f"image_folder: config.data.folder={root!r} is not a directory. {_FOLDER_LAYOUT}"
        )
    train_dir = os.path.join(root, "train")
    test_dirs = [d for d in ("test", "val", "validation") if os.path.isdir(os.path.join(root, d))]
    if os.path.isdir(train_dir) and test_dirs:
        test_dir = os.path.join(root, test_dirs[0])
        classes = _subfolders(train_dir)
        unknown = set(_subfolders(test_dir)) - set(classes)
        if unknown:
            raise DatasetNotAvailableError(
                f"image_folder: {test_dir} has classes missing from train/: {sorted(unknown)}."
            )
        files = {"train": _image_files(train_dir, classes), "test": _image_files(test_dir, classes)}
    else:
        classes = _subfolders(root)
        per_class = _image_files(root, classes)
        # Every 5th file (by name) of a class is held out: 20%, fixed, stable as files are added.
        files = {
            "train": [[f for i, f in enumerate(fs) if i % 5 != 4] for fs in per_class],
            "test": [fs[4::5] for fs in per_class],
        }
    if not any(files["train"]):
        raise DatasetNotAvailableError(
            f"image_folder: no class folder with images in {root}. {_FOLDER_LAYOUT}"
        )
    splits = {}
    for split, per_class in files.items():
        paths = np.array([f for fs in per_class for f in fs], dtype=str)
        labels = np.array([c for c, fs in enumerate(per_class) for _ in fs], dtype=np.int32)
        # A fixed shuffle, so an eval cap or a host's share mixes all classes.
        order = np.random.default_rng(0).permutation(len(paths))
        splits[split] = (paths[order], labels[order])
    return classes, splits


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class count and split sizes of config.dataset from metadata (no full read)."""
    name, size = dataset_name(config), config.data.image_size
    if name == "digits":
        splits = digits_arrays(size)
        return DatasetInfo(name, 10, len(splits["train"][1]), len(splits["test"][1]), size)
    if name == "image_folder":
        classes, splits = folder_splits(config.data.folder)
        return DatasetInfo(
            name, len(classes), len(splits["train"][0]), len(splits["test"][0]), size
        )
    builder = tfds_builder(config)
    return DatasetInfo(
        name=name,
        num_classes=builder.info.features["label"].num_classes,
        num_train_examples=tfds_num_examples(builder, TFDS_SPLITS[name]["pretrain"]),
        num_test_examples=tfds_num_examples(builder, TFDS_SPLITS[name]["test"]),
        image_size=size,
    )
