"""Tests for simclr_jax.data: batch contents, host slicing, resume, tfds, image folders, errors."""

import gc
import itertools
import os
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
from tiny import data_config

from simclr_jax import data
from simclr_jax.data import datasets, decode, streams


def make_config(
    dataset: str = "digits", batch_size: int = 32, **data_fields
) -> ml_collections.ConfigDict:
    """A config with every field data.py reads; `data_fields` override config.data.*."""
    fields = dict(
        image_size=16,
        data_dir=None,
        manual_dir=None,
        folder=None,
        host_crop=False,
        host_size=0,
        prefetch=2,
        num_threads=0,
        eval_max_examples=0,
    )
    fields.update(data_fields)
    return data_config(dataset, batch_size, seed=0, **fields)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    """The first n batches of an iterator, which is then closed."""
    batches = list(itertools.islice(iterator, n))
    if hasattr(iterator, "close"):
        iterator.close()
    return batches


def identities(images: np.ndarray) -> list[bytes]:
    """One key per image (the digits and mock images are all distinct)."""
    return [image.tobytes() for image in images]


# ---------------------------------------------------------------- digits (numpy only)


def test_digits_batches_shapes_dtypes_and_range():
    batch = take(data.pretrain_iterator(make_config(), process_index=0, process_count=1), 1)[0]
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == 0 and batch["image"].max() == 255
    assert set(batch["label"].tolist()) <= set(range(10)) and len(set(batch["label"].tolist())) > 3
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_digits_sizes_and_eval_arrays():
    config = make_config()
    assert data.dataset_info(config) == data.DatasetInfo("digits", 10, 1437, 360, 16)
    x_train, y_train = data.eval_arrays(config, "train")
    x_test, y_test = data.eval_arrays(config, "test")
    assert x_train.shape == (1437, 16, 16, 3) and x_test.shape == (360, 16, 16, 3)
    assert y_train.dtype == np.int32 and np.bincount(y_test).tolist() == [
        36,
        36,
        35,
        37,
        36,
        37,
        36,
        36,
        35,
        36,
    ]
    config.data.eval_max_examples = 100
    x_cap, y_cap = data.eval_arrays(config, "test")
    np.testing.assert_array_equal(x_cap, x_test[:100])
    np.testing.assert_array_equal(y_cap, y_test[:100])


def test_digits_native_size_is_exact_rescale():
    from sklearn.datasets import load_digits

    images, _ = data.eval_arrays(make_config(image_size=8), "train")
    raw = {np.round(d * 255 / 16).astype(np.uint8).tobytes() for d in load_digits().images}
    assert all(key in raw for key in identities(images[..., 0]))


def test_bilinear_upsampling_matches_jax_image_resize():
    images = np.random.default_rng(0).uniform(0, 16, (5, 8, 8)).astype(np.float32)
    expected = jax.image.resize(images, (5, 20, 20), "bilinear")
    np.testing.assert_allclose(datasets.resize_bilinear(images, 20), expected, atol=1e-4)


def test_same_seed_same_batches_other_seed_different():
    config = make_config()
    first = take(data.pretrain_iterator(config, process_index=0, process_count=1), 3)
    again = take(data.pretrain_iterator(config, process_index=0, process_count=1), 3)
    config.seed = 1
    other = take(data.pretrain_iterator(config, process_index=0, process_count=1), 3)
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        assert not np.array_equal(a["image"], c["image"])


def test_global_batch_follows_the_documented_permutation():
    config = make_config(batch_size=64)
    x_train, y_train = data.eval_arrays(config, "train")
    batches = take(data.pretrain_iterator(config, process_index=0, process_count=1), 24)
    steps_per_epoch = 1437 // 64  # 22: the tail of 29 examples is dropped
    for step in (0, 21, 22, 23):
        epoch, i = divmod(step, steps_per_epoch)
        index = np.random.default_rng([0, epoch]).permutation(1437)[i * 64 : (i + 1) * 64]
        np.testing.assert_array_equal(batches[step]["image"], x_train[index])
        np.testing.assert_array_equal(batches[step]["label"], y_train[index])


def test_two_hosts_split_the_global_batch_exactly():
    config = make_config(batch_size=64)
    steps = 1437 // 64
    single = take(data.pretrain_iterator(config, process_index=0, process_count=1), steps + 2)
    hosts = [
        take(data.pretrain_iterator(config, process_index=p, process_count=2), steps + 2)
        for p in (0, 1)
    ]
    for step, whole in enumerate(single):
        parts = [hosts[p][step] for p in (0, 1)]
        assert parts[0]["image"].shape == (32, 16, 16, 3)
        assert not set(identities(parts[0]["image"])) & set(identities(parts[1]["image"]))
        np.testing.assert_array_equal(np.concatenate([b["image"] for b in parts]), whole["image"])
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in parts]), whole["label"])
    epoch = {key for b in single[:steps] for key in identities(b["image"])}
    assert len(epoch) == steps * 64 == 1408


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2), (3, 4)])
def test_resume_equals_uninterrupted_stream(process_index, process_count):
    config = make_config(batch_size=128)  # 11 steps per epoch: resuming at 9 crosses an epoch
    full = take(
        data.pretrain_iterator(config, process_index=process_index, process_count=process_count), 15
    )
    resumed = take(
        data.pretrain_iterator(
            config, process_index=process_index, process_count=process_count, start_step=9
        ),
        6,
    )
    for a, b in zip(full[9:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_no_prefetch_gives_the_same_stream():
    config = make_config()
    threaded = take(data.pretrain_iterator(config, process_index=0, process_count=1), 4)
    config.data.prefetch = 0
    plain = take(data.pretrain_iterator(config, process_index=0, process_count=1), 4)
    for a, b in zip(threaded, plain, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_prefetcher_reraises_and_stops_its_thread():
    def failing():
        yield {"x": np.zeros(1)}
        raise OSError("disk gone")

    iterator = streams.Prefetcher(failing(), 2)
    assert next(iterator)["x"].shape == (1,)
    with pytest.raises(OSError, match="disk gone"):
        next(iterator)

    iterator = streams.Prefetcher(itertools.repeat({"x": np.zeros(1)}), 2)
    next(iterator)
    thread = iterator._thread
    del iterator
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_digits_work_without_tensorflow_or_ml_collections():
    # As on the GPU image: importing tensorflow or ml_collections fails; the config is a namespace.
    fields = make_config(batch_size=8).to_dict()
    code = (
        "import sys, types; sys.modules.update(tensorflow=None, ml_collections=None); "
        "from simclr_jax import data; "
        f"config = types.SimpleNamespace(**{fields!r}); "
        "config.data = types.SimpleNamespace(**config.data); "
        "b = next(data.pretrain_iterator(config)); "
        "x, y = data.eval_arrays(config, 'test'); "
        "print(b['image'].shape, x.shape, data.dataset_info(config).num_train_examples)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert result.stdout.strip() == "(8, 16, 16, 3) (360, 16, 16, 3) 1437", result.stderr[-2000:]


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match=r"batch_size=30 .*process_count=4"):
        data.pretrain_iterator(make_config(batch_size=30), process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"'mnist'.*digits.*cifar10.*imagenet2012.*image_folder"):
        data.dataset_info(make_config("mnist"))
    with pytest.raises(ValueError, match="host_crop"):
        data.pretrain_iterator(make_config(host_crop=True), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="split"):
        data.eval_arrays(make_config(), "validation")


# ---------------------------------------------------------------- tfds (mocked, offline)


def test_cifar10_mock_shapes_labels_and_host_shards():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = make_config("cifar10", batch_size=8, image_size=32)
    with tfds.testing.mock_data(num_examples=40):
        info = data.dataset_info(config)
        single = take(data.pretrain_iterator(config, process_index=0, process_count=1), 5)
        hosts = [
            take(data.pretrain_iterator(config, process_index=p, process_count=2), 5)
            for p in (0, 1)
        ]
        x_test, y_test = data.eval_arrays(config, "test")
        config.data.eval_max_examples = 16
        x_cap, _ = data.eval_arrays(config, "train")
    assert (info.num_classes, info.image_size) == (10, 32)
    for step, whole in enumerate(single):
        assert hosts[0][step]["image"].shape == (4, 32, 32, 3)
        assert hosts[0][step]["image"].dtype == np.uint8
        assert 0 <= whole["label"].min() and whole["label"].max() < 10
        assert not set(identities(hosts[0][step]["image"])) & set(
            identities(hosts[1][step]["image"])
        )
        np.testing.assert_array_equal(
            np.concatenate([hosts[0][step]["image"], hosts[1][step]["image"]]), whole["image"]
        )
    assert len({k for b in single for k in identities(b["image"])}) == 40  # one epoch of 5x8
    assert x_test.shape == (40, 32, 32, 3) and x_test.dtype == np.uint8
    assert y_test.shape == (40,) and y_test.dtype == np.int32 and y_test.max() < 10
    assert x_cap.shape == (16, 32, 32, 3)


def test_stl10_mock_streams_96px_views():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = make_config("stl10", batch_size=4, image_size=96, host_crop=True)
    with tfds.testing.mock_data(num_examples=12):
        info = data.dataset_info(config)
        batch = take(data.pretrain_iterator(config, process_index=0, process_count=1), 1)[0]
        x_test, y_test = data.eval_arrays(config, "test")
    assert info.num_classes == 10 and info.image_size == 96
    assert batch["image"].shape == (4, 2, 96, 96, 3) and batch["label"].dtype == np.int32
    assert x_test.shape == (12, 96, 96, 3) and y_test.shape == (12,)


# ---------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of five 120x90 random-texture images (one PNG each), no train/test folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
            suffix = "png" if i == 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"{i}.{suffix}")
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


def test_image_folder_host_crop_gives_two_different_views(image_folder):
    config = make_config(
        "image_folder", batch_size=4, image_size=32, folder=image_folder, host_crop=True
    )
    assert data.dataset_info(config) == data.DatasetInfo("image_folder", 2, 8, 2, 32)
    batches = take(data.pretrain_iterator(config, process_index=0, process_count=1), 6)
    again = take(data.pretrain_iterator(config, process_index=0, process_count=1), 6)
    resumed = take(
        data.pretrain_iterator(config, process_index=0, process_count=1, start_step=3), 3
    )
    assert batches[0]["image"].shape == (4, 2, 32, 32, 3) and batches[0]["image"].dtype == np.uint8
    for batch in batches:
        views = batch["image"].astype(np.int32)
        assert np.abs(views[:, 0] - views[:, 1]).mean(axis=(1, 2, 3)).min() > 1.0
        assert set(batch["label"].tolist()) <= {0, 1}
    for a, b in zip(batches + batches[3:], again + resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_image_folder_host_size_sends_the_union_and_its_boxes(image_folder):
    config = make_config(
        "image_folder",
        batch_size=4,
        image_size=32,
        folder=image_folder,
        host_crop=True,
        host_size=40,
        prefetch=0,
        num_threads=1,
    )
    batches = take(data.pretrain_iterator(config, process_index=0, process_count=1), 4)
    resumed = take(
        data.pretrain_iterator(config, process_index=0, process_count=1, start_step=2), 2
    )
    for batch in batches:
        assert batch["image"].shape == (4, 40, 40, 3) and batch["image"].dtype == np.uint8
        boxes = batch["crop"]
        assert boxes.shape == (4, 2, 4) and boxes.dtype == np.float32
        # Each window lies inside the union, and together they span it (a JPEG's union may
        # start up to one 16 px MCU left of both windows).
        assert (boxes[..., :2] >= 0).all() and (boxes[..., 2:] > 0).all()
        ends = boxes[..., :2] + boxes[..., 2:]
        assert (ends <= 40 + 1e-4).all()
        np.testing.assert_allclose(boxes[..., 0].min(axis=1), 0, atol=1e-6)
        np.testing.assert_allclose(ends.max(axis=1), 40, atol=1e-4)
    for a, b in zip(batches[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["crop"], b["crop"])


@pytest.mark.parametrize(
    "union_size, ratio",
    [(0, 1), (80, 8), (200, 4), (600, 1)],  # union extent 1000 x 1400: 1000 / 8 >= 80, ...
)
def test_jpeg_union_decodes_at_the_coarsest_scale_that_loses_nothing(union_size, ratio):
    """Small windows far apart: they allow no DCT scaling for 64 px views; the union may.

    With `union_size` the union is scaled as far as keeps it `union_size` px on each side.
    """
    import io

    from PIL import Image

    tf = datasets.import_tf()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1200, 1600, 3), np.uint8)).save(buffer, "JPEG")
    windows = tf.constant([[100, 96, 100, 100], [1000, 1396, 100, 100]], tf.int32)
    union, local = decode.decode_jpeg_windows(
        tf.constant(buffer.getvalue()), tf.constant([1200, 1600, 3]), windows, 64, union_size
    )
    assert union.shape[0] == 1000 // ratio and abs(union.shape[1] - 1400 // ratio) <= 16 // ratio
    # Scaled window edges are rounded to whole pixels.
    np.testing.assert_allclose(local.numpy()[:, 2:], 100 / ratio, atol=1)


def test_image_folder_hosts_and_eval_arrays(image_folder):
    config = make_config("image_folder", batch_size=4, image_size=24, folder=image_folder)
    hosts = [
        take(data.pretrain_iterator(config, process_index=p, process_count=2), 2) for p in (0, 1)
    ]
    seen = [{k for b in batches for k in identities(b["image"])} for batches in hosts]
    assert hosts[0][0]["image"].shape == (2, 24, 24, 3)
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]  # 8 train files, halved
    x_test, y_test = data.eval_arrays(config, "test")
    assert x_test.shape == (2, 24, 24, 3) and sorted(y_test.tolist()) == [0, 1]
    np.testing.assert_array_equal(data.eval_arrays(config, "test")[0], x_test)


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 2)):
        for name in ("a", "b", "c"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(
                    tmp_path / split / name / f"{i}.jpeg"
                )
    config = make_config("image_folder", image_size=8, folder=str(tmp_path))
    assert data.dataset_info(config) == data.DatasetInfo("image_folder", 3, 9, 6, 8)
    _, y_test = data.eval_arrays(config, "test")
    assert np.bincount(y_test).tolist() == [2, 2, 2]


# ---------------------------------------------------------------- missing data


def test_unprepared_tfds_dataset_says_how_to_build_it(tmp_path):
    config = make_config("cifar100", data_dir=str(tmp_path))
    for call in (data.dataset_info, lambda c: data.pretrain_iterator(c, process_count=1)):
        with pytest.raises(data.DatasetNotAvailableError, match=r"cifar100.*tfds build cifar100"):
            call(config)
    with pytest.raises(
        data.DatasetNotAvailableError, match=r"manual_dir.*ILSVRC2012_img_train.tar"
    ):
        data.dataset_info(make_config("imagenet2012", data_dir=str(tmp_path)))


def test_missing_or_empty_image_folder(tmp_path):
    missing = str(tmp_path / "nowhere")
    for call in (data.dataset_info, lambda c: data.pretrain_iterator(c, process_count=1)):
        with pytest.raises(data.DatasetNotAvailableError, match="nowhere.*ROOT/train/<class>"):
            call(make_config("image_folder", folder=missing))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(data.DatasetNotAvailableError, match="no class folder with images"):
        data.eval_arrays(make_config("image_folder", folder=str(tmp_path)), "test")


def test_closed_iterators_leave_no_prefetch_threads():
    gc.collect()
    deadline = time.time() + 2
    while time.time() < deadline and any(
        t.name == "simclr_jax-data-prefetch" for t in threading.enumerate()
    ):
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "simclr_jax-data-prefetch"]
