"""Host-side input pipeline: uint8 image batches, sliced per host, deterministic and resumable.

Two paths, picked by `config.dataset`:

* In memory (digits, cifar10, cifar100): the split is loaded once as a uint8 array and batches
  are indexed in numpy. Epoch e visits `np.random.default_rng([seed, e]).permutation(n)`; global
  batch t is the next `batch_size` indices of the concatenated epochs (each epoch's incomplete
  tail dropped) and host p takes rows `[p*b, (p+1)*b)` of it. The hosts of a step together hold
  exactly the single-host global batch, for any process count, and `start_step` resumes in O(1).
* tf.data (stl10, imagenet2012, image_folder): each host reads its own shard of the files
  (`tfds.split_for_jax_process`, or every process_count-th image file) through a seeded shuffle
  with deterministic tf.data. The stream is reproducible for a fixed seed, process index and
  count; `start_step` skips `start_step * b` records before decoding, so a resumed stream equals
  the uninterrupted one from that step on. Random crops use stateless ops seeded by the record's
  position in the host's stream, so parallel decoding does not change them. With host crops a
  JPEG is decoded once, inside the union of its two crop windows (`crop_windows`).

TensorFlow is imported only where a tfds dataset or an image folder is read (the GPU image has
none), with its GPUs hidden. Datasets are never downloaded: a missing one raises
`DatasetNotAvailableError` saying how to prepare it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    import ml_collections

IN_MEMORY_DATASETS = ("digits", "cifar10", "cifar100")
STREAMED_DATASETS = ("stl10", "imagenet2012", "image_folder")
DATASETS = IN_MEMORY_DATASETS + STREAMED_DATASETS

# tfds split read for pretraining and for each labelled evaluation split.
_TFDS_SPLITS = {
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
_EVAL_CROP_FRACTION = {"stl10": 1.0, "imagenet2012": 0.875, "image_folder": 0.875}
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


def _dataset_name(config: ml_collections.ConfigDict) -> str:
    """config.dataset, checked against the supported names."""
    if config.dataset not in DATASETS:
        raise ValueError(
            f"Unknown config.dataset {config.dataset!r}; allowed: {', '.join(DATASETS)}."
        )
    return config.dataset


@functools.cache
def _tf() -> Any:
    """TensorFlow, imported on first use with its GPUs hidden (JAX owns the accelerators)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; too late to hide them, harmless.
        pass
    return tf


def _tfds() -> Any:
    """tensorflow_datasets, imported after `_tf` has hidden the GPUs."""
    _tf()
    import tensorflow_datasets as tfds

    return tfds


# ---------------------------------------------------------------- in-memory datasets


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights with half-pixel centres and clamped edges."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), lo), 1 - (x - lo))
    np.add.at(weights, (np.arange(n_out), hi), x - lo)
    return weights


def _resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize float [N, H, W, ...] to [N, size, size, ...] (upsampling: as jax.image.resize)."""
    rows = _bilinear_matrix(images.shape[1], size)
    cols = _bilinear_matrix(images.shape[2], size)
    images = np.einsum("ah,nhw...->naw...", rows, images, optimize=True)
    return np.einsum("bw,naw...->nab...", cols, images, optimize=True)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Round float pixel values in [0, 255] to uint8."""
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


@functools.cache
def _digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1797 digits as RGB uint8 at `image_size`, split 1437/360 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = _to_uint8(_resize_bilinear(digits.images.astype(np.float32), image_size) * (255 / 16))
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


def _tfds_builder(config: ml_collections.ConfigDict) -> Any:
    """The tfds builder of config.dataset, or DatasetNotAvailableError if its data is missing."""
    tfds = _tfds()
    name, data_dir = config.dataset, config.data.data_dir or None
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    try:  # tfds.testing.mock_data serves builders that report is_prepared() == False.
        builder.as_dataset(split=_TFDS_SPLITS[name]["test"])
        return builder
    except AssertionError:
        pass
    if name == "imagenet2012":
        return _prepare_imagenet(builder, config.data.manual_dir)
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    raise DatasetNotAvailableError(
        f"Dataset {name!r} is not prepared in {builder.data_dir} and is never downloaded "
        f"implicitly. On a machine with internet access run `tfds build {name}{dir_flag}` "
        f"(or `tfds build {name} --data_dir=DIR`, then set config.data.data_dir=DIR) and copy the "
        "data directory here."
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
            "`tfds build imagenet2012 --manual_dir=DIR --data_dir=DATA_DIR` and set "
            "config.data.data_dir=DATA_DIR."
        )
    tfds = _tfds()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def _tfds_num_examples(builder: Any, split: str) -> int:
    """Examples in a tfds split such as 'unlabelled+train', from metadata (no read)."""
    if builder.info.splits:
        return sum(builder.info.splits[part].num_examples for part in split.split("+"))
    return int(builder.as_dataset(split=split).cardinality())  # mock_data: no split metadata


def _memory_arrays(
    config: ml_collections.ConfigDict, split: str, max_examples: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """All (or the first max_examples) images [N, S, S, 3] uint8 and labels [N] int32 of a split."""
    size = config.data.image_size
    if config.dataset == "digits":
        images, labels = _digits_arrays(size)[split]
        return images[: max_examples or None].copy(), labels[: max_examples or None].copy()
    records = _tfds_builder(config).as_dataset(
        split=_TFDS_SPLITS[config.dataset][split], shuffle_files=False
    )
    if max_examples:
        records = records.take(max_examples)
    # Batched reads: tfds' batch_size=-1 aborts the process under mock_data.
    batches = list(records.batch(1024).as_numpy_iterator())
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches]).astype(np.int32)
    if images.shape[1:3] != (size, size):
        images = _to_uint8(_resize_bilinear(images.astype(np.float32), size))
    return images, labels


def _memory_batches(
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch_size: int,
    rows: slice,
    step: int,
    with_index: bool = False,
) -> Iterator[Batch]:
    """Rows `rows` of every global batch from `step` on (the stream in the module docstring).

    `with_index`: batches also carry 'index', each example's row in the split (int32).
    """
    steps_per_epoch = len(labels) // batch_size
    epoch, order = -1, None
    while True:
        e, i = divmod(step, steps_per_epoch)
        if e != epoch:
            epoch, order = e, np.random.default_rng([seed, e]).permutation(len(labels))
        index = order[i * batch_size : (i + 1) * batch_size][rows]
        batch = {"image": images[index], "label": labels[index]}
        if with_index:
            batch["index"] = index.astype(np.int32)
        yield batch
        step += 1


# ---------------------------------------------------------------- image folders


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
def _folder_splits(root: str | None) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
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


# ---------------------------------------------------------------- tf.data datasets


# The host's random resized crop: SimCLR's ranges, sampled by TF's algorithm on the original image.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_NUM_VIEWS = 2
# libjpeg decodes whole MCUs (8 or 16 px wide); a window starting on that grid is decoded straight
# into the output, one starting elsewhere costs TF an extra copy of every row.
_JPEG_MCU_WIDTH = 16


def crop_windows(image_shape: Any, seed: Any, position: Any) -> Any:
    """The host crop windows int32 [2, 4] (y, x, h, w) of record `position` (TF tensors).

    View v of the record at `position` in a host's stream seeded `seed` is
    `tf.image.stateless_sample_distorted_bounding_box` on the whole image of `image_shape`
    ([H, W, ...]) with seed `[seed, 2 * position + v]`: aspect ratio w/h uniform in 3/4..4/3, then
    the height uniform among those giving an area of 8%..100%, the offset uniform. The pipeline
    crops exactly these windows; `sample_crop_windows` evaluates them for tests.
    """
    tf = _tf()
    windows = []
    for view in range(_NUM_VIEWS):
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            image_shape,
            tf.zeros([1, 0, 4]),
            seed=tf.stack(
                [tf.cast(seed, tf.int64), _NUM_VIEWS * tf.cast(position, tf.int64) + view]
            ),
            # The default 0.1 would require 10% coverage of the whole-image box, raising the
            # smallest area from 8% to 10%.
            min_object_covered=0.0,
            area_range=CROP_AREA_RANGE,
            aspect_ratio_range=CROP_ASPECT_RANGE,
            max_attempts=_CROP_ATTEMPTS,
            use_image_if_no_bounding_boxes=True,
        )
        windows.append(tf.concat([begin[:2], extent[:2]], 0))
    return tf.stack(windows)


def sample_crop_windows(height: int, width: int, seed: int, count: int) -> np.ndarray:
    """`crop_windows` of records 0..count-1 of a height x width image: int32 [count, 2, 4]."""
    tf = _tf()
    shape = tf.constant([height, width, 3], tf.int32)
    ds = tf.data.Dataset.range(count).map(lambda p: crop_windows(shape, seed, p))
    return next(ds.batch(count).as_numpy_iterator())


def _resize_uint8(image: Any, size: int) -> Any:
    """Resize float [h, w, 3] to uint8 [size, size, 3]: bilinear, after 2x box halvings if needed.

    Plain bilinear touches every source pixel only while it shrinks by at most 2x; beyond that it
    would skip pixels (aliasing), so each side is first halved by 2-pixel averages until it is
    within 2x of `size`. That antialiases like a wider filter at a small fraction of the cost of
    `antialias=True`, which took most of the host's time. Halvings are rare for ImageNet-sized
    images (a crop wider than 448 px) and make large images cheap.
    """
    tf = _tf()

    for axis, window in ((0, [2, 1]), (1, [1, 2])):
        (image,) = tf.while_loop(
            lambda x, axis=axis: tf.shape(x)[axis] > 2 * size,
            lambda x, window=window: (tf.nn.avg_pool2d(x[None], window, window, "VALID")[0],),
            (image,),
            shape_invariants=(tf.TensorShape([None, None, 3]),),
        )
    resized = tf.image.resize(image, [size, size], method="bilinear")
    # Bilinear weights are non-negative and sum to 1: the result stays within [0, 255].
    return tf.cast(tf.round(resized), tf.uint8)


# libjpeg can decode at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients: the scaled inverse
# DCT is cheaper, acts as an antialiasing filter, and spares the float halvings of
# `_resize_uint8` on large images.
_DCT_RATIOS = (1, 2, 4, 8)


def _union_bounds(windows: Any) -> tuple[Any, Any]:
    """(begin, end) int32 [2] (y, x) of the box spanning `windows` (int32 [k, 4] y, x, h, w)."""
    tf = _tf()
    begin = tf.reduce_min(windows[:, :2], axis=0)
    return begin, tf.reduce_max(windows[:, :2] + windows[:, 2:], axis=0)


def _decode_jpeg_windows(
    data: Any, shape: Any, windows: Any, size: int, union_size: int = 0
) -> tuple[Any, Any]:
    """Decodes the union of `windows` (int32 [k, 4] y, x, h, w) of a JPEG of `shape`, DCT-scaled.

    Returns (uint8 [h, w, 3] union, windows in its pixels). The scale is the smallest 1/r that
    leaves every window at least `size` px on each side, so the resize that follows still only
    shrinks where it did at full scale; or, with `union_size`, that leaves the union at least
    `union_size` px on each side, if smaller (the union is resized to `union_size` next, so
    its windows lose nothing either). Scaled windows are rounded to whole pixels (at most r/2
    original pixels per edge).
    """
    tf = _tf()
    shape = shape[:2]
    ratios = tf.constant(_DCT_RATIOS[1:], tf.int32)
    smallest = tf.reduce_min(windows[:, 2:])
    ratio_index = tf.reduce_sum(tf.cast(smallest >= size * ratios, tf.int32))
    if union_size:
        begin, end = _union_bounds(windows)
        extent = end - begin
        by_union = tf.reduce_sum(tf.cast(tf.reduce_min(extent) >= union_size * ratios, tf.int32))
        ratio_index = tf.maximum(ratio_index, by_union)

    def decode(ratio: int) -> Callable[[], tuple[Any, Any]]:
        def branch() -> tuple[Any, Any]:
            scaled_shape = -(-shape // ratio)  # libjpeg's output size: ceil(side / ratio)
            begin = (windows[:, :2] + ratio // 2) // ratio
            end = tf.minimum((windows[:, :2] + windows[:, 2:] + ratio // 2) // ratio, scaled_shape)
            union_begin = tf.reduce_min(begin, axis=0)
            mcu = max(1, _JPEG_MCU_WIDTH // ratio)  # see _JPEG_MCU_WIDTH
            union_begin = union_begin - tf.stack([0, union_begin[1] % mcu])
            union_end = tf.reduce_max(end, axis=0)
            union = tf.image.decode_and_crop_jpeg(
                data, tf.concat([union_begin, union_end - union_begin], 0), channels=3, ratio=ratio
            )
            local = tf.concat([begin - union_begin, end - begin], axis=1)
            return union, local

        return branch

    return tf.switch_case(ratio_index, [decode(r) for r in _DCT_RATIOS])


def _decode_union(
    data: Any, size: int, seed: int, position: Any, union_size: int = 0
) -> tuple[Any, Any]:
    """The union of a record's two crop windows, uint8 [h, w, 3], and the windows in its pixels.

    The image is decoded once: for JPEGs only the union (decoding is most of the cost, and
    decoding each window separately nearly doubles it), DCT-scaled where the windows (or, with
    `union_size`, the union) allow; other formats whole, then sliced.
    """
    tf = _tf()

    def jpeg() -> tuple[Any, Any]:
        shape = tf.image.extract_jpeg_shape(data)
        windows = crop_windows(shape, seed, position)
        return _decode_jpeg_windows(data, shape, windows, size, union_size)

    def other() -> tuple[Any, Any]:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        windows = crop_windows(tf.shape(image), seed, position)
        begin, end = _union_bounds(windows)
        local = tf.concat([windows[:, :2] - begin, windows[:, 2:]], axis=1)
        return image[begin[0] : end[0], begin[1] : end[1]], local

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _decode_views(data: Any, size: int, seed: int, position: Any) -> Any:
    """SimCLR's two random resized crops of an encoded image, uint8 [2, size, size, 3]."""
    tf = _tf()
    image, windows = _decode_union(data, size, seed, position)
    views = []
    for view in range(_NUM_VIEWS):
        y, x, h, w = tf.unstack(windows[view])
        # Slice before the cast: copying uint8 moves a quarter of the bytes.
        views.append(_resize_uint8(tf.cast(image[y : y + h, x : x + w], tf.float32), size))
    return tf.stack(views)


def _decode_union_resized(
    data: Any, size: int, host_size: int, seed: int, position: Any
) -> tuple[Any, Any]:
    """The crop windows' union as uint8 [host_size, host_size, 3] and the windows in it [2, 4].

    The windows are float32 (y, x, h, w) in the resized union's pixels: the device cuts the views
    out of it (`augment.views` with boxes). One resize per image instead of one per view keeps
    the host's cost close to a plain decode-and-crop. The union is stretched to a square, which
    the windows' coordinates undo.
    """
    tf = _tf()
    image, windows = _decode_union(data, size, seed, position, union_size=host_size)
    scale = host_size / tf.cast(tf.shape(image)[:2], tf.float32)
    boxes = tf.cast(windows, tf.float32) * tf.tile(scale, [2])[None]
    return _resize_uint8(tf.cast(image, tf.float32), host_size), boxes


def _decode_centre(data: Any, size: int, fraction: float) -> Any:
    """The centre square spanning `fraction` of the shorter side, uint8 [size, size, 3]."""
    tf = _tf()

    def window(shape: Any) -> Any:
        side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * fraction, tf.int32)
        return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])

    def jpeg() -> Any:  # decodes only the window
        shape = tf.image.extract_jpeg_shape(data)
        image, local = _decode_jpeg_windows(data, shape, window(shape)[None], size)
        y, x, h, w = tf.unstack(local[0])
        return image[y : y + h, x : x + w]

    def other() -> Any:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        y, x, h, w = tf.unstack(window(tf.shape(image)))
        return image[y : y + h, x : x + w]

    return _resize_uint8(tf.cast(tf.cond(tf.io.is_jpeg(data), jpeg, other), tf.float32), size)


def _records(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    with_index: bool = False,
) -> tuple[Any, Callable[[Any], Any]]:
    """(tf.data of {'image', 'label'}, fn turning 'image' into encoded bytes) for this host.

    `with_index`: records also carry 'index' int32, the example's position in the whole split
    (image folders only; a memory bank needs it).
    """
    tf = _tf()
    if config.dataset == "image_folder":
        _, splits = _folder_splits(config.data.folder)
        paths, labels = splits["train" if split == "pretrain" else split]
        per_host = len(paths) // process_count  # equal shares keep the hosts' epochs in step
        columns = {"image": paths, "label": labels}
        if with_index:
            columns["index"] = np.arange(len(paths), dtype=np.int32)
        columns = {k: a[process_index::process_count][:per_host] for k, a in columns.items()}
        records = tf.data.Dataset.from_tensor_slices(columns)
        return records, tf.io.read_file
    if with_index:
        raise ValueError(
            f"example indices (for a memory bank) are not available for the streamed tfds "
            f"dataset {config.dataset!r}; use an in-memory dataset or an image folder"
        )
    tfds = _tfds()
    builder = _tfds_builder(config)
    tfds_split = tfds.split_for_jax_process(
        _TFDS_SPLITS[config.dataset][split],
        process_index=process_index,
        process_count=process_count,
        drop_remainder=True,
    )
    records = builder.as_dataset(
        split=tfds_split,
        shuffle_files=seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},  # decode later, fused with the crop
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    return records, tf.identity


def _tf_options(config: ml_collections.ConfigDict) -> Any:
    """tf.data options: deterministic order, config.data.num_threads threads (0: TF's choice).

    With num_threads = n > 0 the pipeline's work runs on a private pool of n threads, each op on
    one thread, so n bounds the host cores it keeps busy.
    """
    options = _tf().data.Options()
    options.deterministic = True
    if config.data.num_threads:
        options.threading.private_threadpool_size = config.data.num_threads
        # Per-image ops are small: splitting one over threads costs more than it saves, and
        # without this cap they would borrow TF's global intra-op pool beyond the n threads.
        options.threading.max_intra_op_parallelism = 1
        options.autotune.cpu_budget = config.data.num_threads
    return options


def _host_seed(seed: int, process_index: int) -> int:
    """The seed of a host's shuffle and crops (`crop_windows`) for root seed `seed`."""
    return int(np.random.default_rng([seed, process_index]).integers(2**31))


def _streamed_batches(
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    batch: int,
    step: int,
    with_index: bool = False,
) -> Iterator[Batch]:
    """This host's pretraining batches from a tfds dataset or image folder, from `step` on."""
    tf = _tf()
    seed = _host_seed(config.seed, process_index)
    records, load = _records(
        config,
        "pretrain",
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        with_index=with_index,
    )
    size, host_size = config.data.image_size, getattr(config.data, "host_size", 0)

    def prepare(position: Any, example: Any) -> dict[str, Any]:
        data = load(example["image"])
        label = tf.cast(example["label"], tf.int32)
        if not config.data.host_crop:
            return {"image": _decode_centre(data, size, 1.0), "label": label}
        # Two independent crops of the original image, cut out here or (host_size) on device.
        if not host_size:
            return {"image": _decode_views(data, size, seed, position), "label": label}
        image, boxes = _decode_union_resized(data, size, host_size, seed, position)
        return {"image": image, "crop": boxes, "label": label}

    ds = records.shuffle(config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # Number the records before skipping, so crop seeds do not depend on where a run resumed.
    ds = ds.repeat().enumerate().skip(step * batch)
    # 2n calls in flight on the n threads: a thread that finishes one image starts the next at
    # once instead of sleeping until tf.data's scheduler thread wakes up (~4% more images/s).
    calls = 2 * config.data.num_threads or tf.data.AUTOTUNE
    if with_index:
        ds = ds.map(
            lambda position, ex: {**prepare(position, ex), "index": ex["index"]},
            num_parallel_calls=calls,
        )
    else:
        ds = ds.map(prepare, num_parallel_calls=calls)
    ds = ds.batch(batch, drop_remainder=True).prefetch(1)
    return ds.with_options(_tf_options(config)).as_numpy_iterator()


def _streamed_arrays(
    config: ml_collections.ConfigDict, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-cropped eval images [N, S, S, 3] uint8 and labels [N] int32 of a tf.data dataset."""
    tf = _tf()
    records, load = _records(config, split)
    if config.data.eval_max_examples:
        records = records.take(config.data.eval_max_examples)
    size, fraction = config.data.image_size, _EVAL_CROP_FRACTION[config.dataset]
    ds = records.map(
        lambda ex: (
            _decode_centre(load(ex["image"]), size, fraction),
            tf.cast(ex["label"], tf.int32),
        ),
        num_parallel_calls=config.data.num_threads or tf.data.AUTOTUNE,
    )
    batches = list(ds.batch(256).with_options(_tf_options(config)).as_numpy_iterator())
    if not batches:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


# ---------------------------------------------------------------- prefetching


class _Prefetcher(Iterator[Batch]):
    """Iterates `source` on a daemon thread, keeping up to `size` items ready."""

    def __init__(self, source: Iterator[Batch], size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        # The thread gets no reference to self, so dropping the iterator collects it and stops it.
        self._thread = threading.Thread(
            target=_produce,
            args=(source, self._queue, self._stop),
            daemon=True,
            name="simclr_jax-data-prefetch",
        )
        self._thread.start()

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self.close()
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer thread (it exits within 0.1 s)."""
        self._stop.set()

    def __del__(self) -> None:
        self.close()


@dataclasses.dataclass
class _End:
    """The producer finished; `error` is what it raised, if anything."""

    error: BaseException | None = None


def _produce(source: Iterator[Batch], out: queue.Queue, stop: threading.Event) -> None:
    """Move items from `source` into `out` until it ends, fails, or `stop` is set."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)  # wake up now and then to notice `stop`
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in source:
            if not put(item):
                return
        put(_End())
    except BaseException as error:  # handed to the consumer, which re-raises it
        put(_End(error))


# ---------------------------------------------------------------- public API


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class count and split sizes of config.dataset from metadata (no full read)."""
    name, size = _dataset_name(config), config.data.image_size
    if name == "digits":
        splits = _digits_arrays(size)
        return DatasetInfo(name, 10, len(splits["train"][1]), len(splits["test"][1]), size)
    if name == "image_folder":
        classes, splits = _folder_splits(config.data.folder)
        return DatasetInfo(
            name, len(classes), len(splits["train"][0]), len(splits["test"][0]), size
        )
    builder = _tfds_builder(config)
    return DatasetInfo(
        name=name,
        num_classes=builder.info.features["label"].num_classes,
        num_train_examples=_tfds_num_examples(builder, _TFDS_SPLITS[name]["pretrain"]),
        num_test_examples=_tfds_num_examples(builder, _TFDS_SPLITS[name]["test"]),
        image_size=size,
    )


def pretrain_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    with_index: bool = False,
) -> Iterator[Batch]:
    """Endless per-host batches {'image': uint8 [b, S, S, 3], 'label': int32 [b]}.

    `with_index`: batches also carry 'index' int32 [b], each example's position in the training
    split, the same on every host and after a resume (for a memory bank; in-memory datasets and
    image folders, not streamed tfds datasets).

    With `config.data.host_crop` images are two host crops [b, 2, S, S, 3], or with
    `config.data.host_size = H` the union of the two crop windows [b, H, H, 3] plus the windows
    'crop': float32 [b, 2, 4] (y, x, h, w in its pixels) that `augment.views` cuts out on device.
    `b = config.batch_size // process_count`; labels are -1 for unlabelled images. The
    stream starts at global batch `start_step`. Close the iterator (or drop it) to stop its thread.
    """
    name = _dataset_name(config)
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
    if name in IN_MEMORY_DATASETS:
        if config.data.host_crop or getattr(config.data, "host_size", 0):
            raise ValueError(
                f"config.data.host_crop and host_size are for {', '.join(STREAMED_DATASETS)}, "
                f"not {name}."
            )
        images, labels = _memory_arrays(config, "train")
        if len(labels) < config.batch_size:
            raise ValueError(
                f"config.batch_size={config.batch_size} > {len(labels)} {name} examples."
            )
        rows = slice(process_index * batch, (process_index + 1) * batch)
        batches = _memory_batches(
            images, labels, config.seed, config.batch_size, rows, start_step, with_index
        )
    else:
        batches = _streamed_batches(
            config, process_index, process_count, batch, start_step, with_index
        )
    return _Prefetcher(batches, config.data.prefetch) if config.data.prefetch > 0 else batches


def eval_arrays(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, S, S, 3] and labels int32 [N] of a labelled split, in a fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if _dataset_name(config) in IN_MEMORY_DATASETS:
        return _memory_arrays(config, split, config.data.eval_max_examples)
    return _streamed_arrays(config, split)


# ---------------------------------------------------------------- labelled streams (downstream)
#
# The downstream jobs (linear evaluation, fine-tuning, kNN) read labelled splits as streams too:
# a host holds `prefetch + 2` batches, never the split. Train streams follow the pretraining
# stream's rules (seeded, per host, resumable by step); eval streams visit every example of a
# split exactly once, each host its own shard, padded to the same number of batches on every
# host with 'mask' 0 on the padding rows.


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
    paths, _ = _folder_splits(config.data.folder)[1]["train"]
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
    if "label" not in _tfds_builder(config).info.features:
        raise ValueError(f"config.dataset={config.dataset!r} has no labels for split {split!r}.")


def train_labels(config: ml_collections.ConfigDict) -> np.ndarray:
    """int32 labels of the labelled train split in its fixed order (images are not decoded)."""
    name = _dataset_name(config)
    if name == "digits":
        return _digits_arrays(config.data.image_size)["train"][1].copy()
    if name == "image_folder":
        return _folder_splits(config.data.folder)[1]["train"][1].copy()
    tfds = _tfds()
    records = _tfds_builder(config).as_dataset(
        split=_TFDS_SPLITS[name]["train"],
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
    name = _dataset_name(config)
    if _split_name(split) == "train" and keep is None and subset in OFFICIAL_SUBSETS:
        config = _labelled_config(config, subset)
    _check_labelled(config, split)
    if split == "train" and keep is not None:
        n = len(keep)
    elif split == "train" and subset in OFFICIAL_SUBSETS:
        n = _tfds_num_examples(_tfds_builder(config), "train")
    elif split == "test":
        n = dataset_info(config).num_test_examples
    elif name in ("digits", "image_folder"):
        n = len(train_labels(config))
    else:
        n = _tfds_num_examples(_tfds_builder(config), _TFDS_SPLITS[name]["train"])
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
    tf = _tf()
    if config.dataset == "image_folder":
        paths, labels = _folder_splits(config.data.folder)[1][split]
        if keep is not None:
            paths, labels = paths[keep], labels[keep]
        if max_examples:
            paths, labels = paths[:max_examples], labels[:max_examples]
        # Equal shares keep the hosts' epochs in step (train); eval keeps every example.
        per_host = len(paths) // process_count if drop_remainder else len(paths)
        paths, labels = (a[process_index::process_count][:per_host] for a in (paths, labels))
        records = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        return records, tf.io.read_file
    tfds = _tfds()
    builder = _tfds_builder(config)
    name = _TFDS_SPLITS[config.dataset][split]
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
    images, labels = _memory_arrays(config, split)
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
    _dataset_name(config)
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
        batches = _memory_batches(images, labels, seed, batch_size, rows, start_step)
    else:
        tf = _tf()
        host_seed = _host_seed(seed, process_index)
        records, load = _labelled_records(
            config, "train", keep, process_index, process_count, host_seed, drop_remainder=True
        )
        size = config.data.image_size
        side, fraction = (
            (config.data.host_size or size, 1.0)
            if augment
            else (size, _EVAL_CROP_FRACTION.get(config.dataset, 1.0))
        )

        def prepare(example: Any) -> dict[str, Any]:
            image = _decode_centre(load(example["image"]), side, fraction)
            return {"image": image, "label": tf.cast(example["label"], tf.int32)}

        ds = records.shuffle(config.data.shuffle_buffer, seed=host_seed)
        ds = ds.repeat().skip(start_step * b)
        ds = ds.map(prepare, num_parallel_calls=2 * config.data.num_threads or tf.data.AUTOTUNE)
        ds = ds.batch(b, drop_remainder=True).prefetch(1)
        batches = ds.with_options(_tf_options(config)).as_numpy_iterator()
    return _Prefetcher(batches, config.data.prefetch) if config.data.prefetch > 0 else batches


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
    _dataset_name(config)
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
    tf = _tf()
    records, load = _labelled_records(
        config, split, None, process_index, process_count, None, False, max_examples
    )
    fraction = _EVAL_CROP_FRACTION.get(config.dataset, 1.0)  # cifar: the whole 32 px image
    ds = records.map(
        lambda ex: {
            "image": _decode_centre(load(ex["image"]), size, fraction),
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
    return ds.with_options(_tf_options(config)).as_numpy_iterator(), num_batches
