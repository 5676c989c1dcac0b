"""Streamed data on random-access sources: a tfds dataset as ArrayRecord, an image folder.

The input contract: epoch e is a seeded permutation of the whole split, global batch t the next
batch_size indices, host p rows [p*b, (p+1)*b); a stream started at step s equals the
uninterrupted one from s, on any process count; a TFRecord-only dataset is refused in one line.
"""

import itertools
import logging
import os
import platform
import resource
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest
from tiny import data_config

from simclr_jax import data
from simclr_jax.data import host_malloc, labelled, pipeline, sources, streams

tfds = pytest.importorskip("tensorflow_datasets")

NUM_TRAIN, NUM_VAL = 22, 6  # 22 = 5 steps of 4 per epoch + a tail of 2 that waits


def make_config(dataset: str, batch_size: int = 4, **data_fields) -> ml_collections.ConfigDict:
    """A config with every field the data layer reads."""
    fields = dict(
        image_size=16,
        data_dir=None,
        manual_dir=None,
        folder=None,
        host_crop=False,
        host_size=0,
        prefetch=0,
        num_threads=1,
        eval_max_examples=0,
    )
    fields.update(data_fields)
    return data_config(dataset, batch_size, seed=3, **fields)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    """The first n batches of an iterator, which is then closed."""
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


def assert_same(a: list[dict], b: list[dict]) -> None:
    """Equal batch lists, key by key."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _examples(count: int, seed: int) -> list[tuple[str, dict]]:
    """(key, example) pairs of random-texture images of varied sizes named like ImageNet's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"n0000000{i % 3}_{seed}{i}.JPEG"
        out.append((name, {"image": image, "label": i % 3, "file_name": name}))
    return out


def build(data_dir: str, name: str, splits: dict[str, int], file_format: str) -> None:
    """Prepares tfds dataset `name` (its registered version and features) in data_dir."""
    registered = tfds.builder(name)
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name.split("/")[0],
        config=name.split("/")[1] if "/" in name else None,
        version=str(registered.version),
        features=registered.info.features,
        split_datasets={s: _examples(n, seed=k) for k, (s, n) in enumerate(splits.items())},
        data_dir=data_dir,
        file_format=file_format,
    )


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    """Split metadata caches (`data.subsets`) go to a temporary folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory):
    """imagenet2012 (22 train, 6 validation) as ArrayRecord, as `tfds build` prepares it."""
    root = str(tmp_path_factory.mktemp("tfds_array_record"))
    build(root, "imagenet2012", {"train": NUM_TRAIN, "validation": NUM_VAL}, "array_record")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/train/<class>/*.jpg (22) + ROOT/val/<class>/*.jpg (6) of varied sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        for i in range(count):
            (root / split / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{i % 3}" / f"{i}.jpg", quality=90)
    return str(root)


@pytest.fixture(params=["image_folder", "imagenet2012"])
def streamed(request, folder, array_record_dir):
    """(config maker, number of train examples) of each random-access source."""

    def config(**kwargs) -> ml_collections.ConfigDict:
        if request.param == "image_folder":
            return make_config("image_folder", folder=folder, **kwargs)
        return make_config("imagenet2012", data_dir=array_record_dir, **kwargs)

    return config


def stream(config, start: int, steps: int, p: int = 0, count: int = 1, **kw) -> list[dict]:
    """`steps` batches of host p of `count` from global step `start`."""
    it = data.pretrain_iterator(
        config, process_index=p, process_count=count, start_step=start, **kw
    )
    return take(it, steps)


# ---------------------------------------------------------------- the input contract


def test_batches_are_the_documented_permutation_of_the_whole_split(streamed):
    config = streamed()
    batches = stream(config, 0, 7, with_index=True)  # 5 steps an epoch: crosses into epoch 1
    for step, batch in enumerate(batches):
        want = streams.batch_indices(config.seed, NUM_TRAIN, 4, step)
        np.testing.assert_array_equal(batch["index"], want)
        assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
    epoch = np.concatenate([b["index"] for b in batches[:5]])
    assert len(set(epoch.tolist())) == 20  # one epoch: 20 distinct examples of 22


@pytest.mark.parametrize("host_size", [0, 24])
def test_resume_at_any_step_equals_the_uninterrupted_stream(streamed, host_size):
    config = streamed(host_crop=True, host_size=host_size)
    full = stream(config, 0, 8)
    for start in (3, 5, 6):  # 5 is the first step of epoch 1
        assert_same(stream(config, start, 8 - start), full[start:])


@pytest.mark.parametrize("count", [2, 4])
def test_hosts_hold_exactly_the_single_host_global_batch(streamed, count):
    config = streamed(host_crop=True, host_size=24)
    whole = stream(config, 4, 3)
    hosts = [stream(config, 4, 3, p, count) for p in range(count)]
    for step, batch in enumerate(whole):
        for key in batch:  # crops too: a row's windows depend on its global position only
            rows = np.concatenate([hosts[p][step][key] for p in range(count)])
            np.testing.assert_array_equal(rows, batch[key], err_msg=key)


def test_a_run_resumes_on_another_process_count(streamed):
    config = streamed()
    single = stream(config, 0, 6)
    # Steps 0-2 on 2 processes, then preempted; steps 3-5 resumed on 4 (and on 1).
    for count in (2, 4, 1):
        resumed = [stream(config, 3, 3, p, count) for p in range(count)]
        for step in range(3):
            rows = np.concatenate([resumed[p][step]["image"] for p in range(count)])
            np.testing.assert_array_equal(rows, single[3 + step]["image"])


def test_a_resume_reads_a_bounded_number_of_records_at_any_step(folder, monkeypatch):
    """O(1): the first batch of step 10**6 reads what the first of step 0 reads, not the past."""
    reads = []
    real = sources.FolderSource.read

    def counting(self, indices):
        reads.append(len(indices))
        return real(self, indices)

    monkeypatch.setattr(sources.FolderSource, "read", counting)
    config = make_config("image_folder", folder=folder, batch_size=4)
    counts = []
    for start in (0, 10**6):
        reads.clear()
        it = data.pretrain_iterator(config, process_index=0, process_count=1, start_step=start)
        next(it)
        it.close()
        counts.append(sum(reads))
    threads = pipeline.READ_THREADS
    bound = ((pipeline.READ_AHEAD_PER_THREAD + 1) * threads + 2) * 4  # read ahead, chunks of 4
    assert max(counts) <= bound, counts


# Freed 100 KB records faulted in again: a thread allocates and frees a chunk of them five times.
_REFAULTS = """
import resource, sys, threading
if sys.argv[1] == "set":
    from simclr_jax.data import host_malloc
    assert host_malloc.retain_freed_memory()
faults = []
record = bytes(range(256)) * 400
def chunks():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        chunk = [bytearray(record[:100_000]) for _ in range(128)]  # copied, as a reader does
        del chunk
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=chunks)
thread.start()
thread.join()
print(sum(faults[1:]))
"""


@pytest.mark.skipif(
    not host_malloc.applies(os.environ, platform.libc_ver()[0]), reason="glibc's malloc only"
)
def test_freed_record_chunks_are_reused_without_page_faults():
    """host_malloc: a freed chunk's pages stay mapped for the next (glibc trims them otherwise)."""
    faults = {}
    for mode in ("default", "set"):
        out = subprocess.run(
            [sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True, check=True
        )
        faults[mode] = int(out.stdout)
    # 4 chunks of 128 x 25 pages: glibc's default faults most of them in again.
    assert faults["default"] > 4 * 128 * 25 // 2, faults
    assert faults["set"] < faults["default"] // 20, faults


@pytest.mark.skipif(
    not host_malloc.applies(os.environ, platform.libc_ver()[0]), reason="glibc's malloc only"
)
def test_the_malloc_settings_outlast_tf_datas_own(folder):
    """A stream's settings hold after its iterator is built, which sets tf.data's own (128 KiB)."""
    config = make_config("image_folder", folder=folder, batch_size=4)
    it = data.pretrain_iterator(config, process_index=0, process_count=1)
    next(it)
    it.close()
    faults = []
    block = bytes(range(256)) * 4096  # 1 MiB, over tf.data's mmap threshold

    def buffers():
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            held = [bytearray(block) for _ in range(8)]  # as an image file's read buffer
            del held
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    thread = threading.Thread(target=buffers)
    thread.start()
    thread.join()
    # mmapped, each of the 4 later rounds would fault in 8 x 256 pages again; kept, none.
    assert sum(faults[1:]) < 4 * 8 * 256 // 20, faults


def test_malloc_settings_of_the_user_are_kept():
    """Only glibc, and never over a MALLOC_* variable or a malloc tunable the user set."""
    assert host_malloc.applies({}, "glibc")
    assert host_malloc.applies({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, "glibc")
    assert not host_malloc.applies({}, "")
    assert not host_malloc.applies({"MALLOC_TRIM_THRESHOLD_": "1"}, "glibc")
    assert not host_malloc.applies({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "glibc")


# ---------------------------------------------------------------- tfds formats


def test_a_tfrecord_only_dataset_is_refused_then_converted(tmp_path, array_record_dir):
    root = str(tmp_path)
    build(root, "imagenet2012", {"train": NUM_TRAIN, "validation": NUM_VAL}, "tfrecord")
    config = make_config("imagenet2012", data_dir=root)
    version_dir = os.path.join(root, "imagenet2012", str(tfds.builder("imagenet2012").version))
    with pytest.raises(data.DatasetNotAvailableError) as refused:
        data.pretrain_iterator(config, process_index=0, process_count=1)
    message = str(refused.value)
    assert "\n" not in message and "'imagenet2012'" in message
    assert f"python -m simclr_jax.data.convert {version_dir}" in message
    assert not any(".array_record-" in f for f in os.listdir(version_dir))  # nothing converted

    from simclr_jax.data import convert

    convert.main([version_dir, "--workers=2"])
    files = os.listdir(version_dir)
    assert sum(".tfrecord-" in f for f in files) == sum(".array_record-" in f for f in files) == 2
    # The same examples as the dataset prepared as ArrayRecord directly, in the same order.
    got = stream(config, 2, 2, with_index=True)
    want = stream(make_config("imagenet2012", data_dir=array_record_dir), 2, 2, with_index=True)
    assert_same(got, want)
    convert.main([version_dir])  # a second run finds every shard done


# ---------------------------------------------------------------- labelled streams


def test_labelled_train_stream_resumes_and_splits_over_hosts(streamed):
    config = streamed()
    keep = np.arange(0, NUM_TRAIN, 2)  # 11 examples: a label subset as an index list

    def run(start, steps, p=0, count=1):
        return take(
            labelled.labelled_train_iterator(
                config, 4, keep=keep, seed=5, start_step=start, process_index=p, process_count=count
            ),
            steps,
        )

    full = run(0, 5)
    assert_same(run(2, 3), full[2:])
    halves = [run(2, 3, p, 2) for p in (0, 1)]
    for step in range(3):
        labels = np.concatenate([halves[p][step]["label"] for p in (0, 1)])
        np.testing.assert_array_equal(labels, full[2 + step]["label"])
    assert {int(x) for b in full for x in b["label"]} <= {0, 1, 2}


@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_visit_every_example_once(streamed, count):
    config = streamed()
    want_x, want_y = data.eval_arrays(config, "test")
    assert want_x.shape == (NUM_VAL, 16, 16, 3)
    seen_x, seen_y = [], []
    for p in range(count):
        batches, n = labelled.eval_batches(config, "test", 4, process_index=p, process_count=count)
        batches = list(batches)
        assert len(batches) == n
        for b in batches:
            seen_x.append(b["image"][b["mask"]])
            seen_y.append(b["label"][b["mask"]])
    order = np.concatenate([np.arange(NUM_VAL)[p::count] for p in range(count)])
    np.testing.assert_array_equal(np.concatenate(seen_x), want_x[order])
    np.testing.assert_array_equal(np.concatenate(seen_y), want_y[order])


def test_official_subset_is_an_index_list_on_the_train_source(tmp_path, array_record_dir):
    config = make_config("imagenet2012", data_dir=array_record_dir)
    _, names = labelled.split_metadata(config, "train")
    assert len(names) == NUM_TRAIN and all(n.endswith(".JPEG") for n in names)
    chosen = sorted(names[[1, 4, 7]])
    (tmp_path / "1percent.txt").write_text("\n".join(chosen) + "\nn09999999_1.JPEG\n")
    keep = labelled.subset_indices(config, str(tmp_path / "1percent.txt"))
    np.testing.assert_array_equal(keep, [1, 4, 7])
    assert labelled.labelled_size(config, "train", subset=str(tmp_path / "1percent.txt")) == 3
    with pytest.raises(data.DatasetNotAvailableError, match="1percent.txt"):
        labelled.subset_indices(config, "1pct")  # neither the list nor its tfds dataset here


def test_official_subset_names_come_from_its_prepared_tfds_dataset(tmp_path, array_record_dir):
    import shutil

    root = str(tmp_path)
    shutil.copytree(os.path.join(array_record_dir, "imagenet2012"), f"{root}/imagenet2012")
    config = make_config("imagenet2012", data_dir=root)
    train_names = labelled.split_metadata(config, "train")[1]
    # tfds prepares imagenet2012_subset/1pct from the official list; here: 4 of the train images.
    registered = tfds.builder("imagenet2012_subset/1pct")
    chosen = [e for e in _examples(NUM_TRAIN, seed=0) if e[0] in set(train_names[[0, 5, 9, 20]])]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="imagenet2012_subset",
        config="1pct",
        version=str(registered.version),
        features=registered.info.features,
        split_datasets={"train": chosen, "validation": chosen[:1]},
        data_dir=root,
        file_format="array_record",
    )
    keep = labelled.subset_indices(config, "1pct")
    np.testing.assert_array_equal(keep, [0, 5, 9, 20])
    batch = next(
        labelled.labelled_train_iterator(
            config, 4, subset="1pct", process_index=0, process_count=1, seed=1
        )
    )
    np.testing.assert_array_equal(
        np.sort(batch["label"]), np.sort(labelled.train_labels(config)[[0, 5, 9, 20]])
    )


# ---------------------------------------------------------------- bad files


BAD_FILES = ("empty.jpg", "notes.jpg", "truncated.jpg")


@pytest.fixture
def bad_folder(tmp_path):
    """20 good JPEGs and 3 bad files (empty, text, truncated JPEG) in two classes."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in (0, 1):
        (tmp_path / f"c{c}").mkdir()
    for i in range(20):
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"c{i % 2}" / f"{i:02d}.jpg")
    (tmp_path / "c0" / "empty.jpg").write_bytes(b"")
    (tmp_path / "c0" / "notes.jpg").write_text("not an image")
    good = (tmp_path / "c0" / "00.jpg").read_bytes()
    (tmp_path / "c1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return str(tmp_path)


def test_bad_files_are_replaced_counted_named_and_alike_on_resume(bad_folder, caplog):
    config = make_config("image_folder", folder=bad_folder, host_crop=True, host_size=24)
    paths = data.folder_splits(bad_folder)[1]["train"][0]
    names = np.array([os.path.basename(p) for p in paths])
    steps = 2 * (len(paths) // 4) + 1  # two epochs and a step
    with caplog.at_level(logging.WARNING, logger="simclr_jax.data.pipeline"):
        it = data.pretrain_iterator(config, process_index=0, process_count=1, with_index=True)
        full = [next(it) for _ in range(steps)]
        stats = it.stats
        it.close()
    assert stats.bad >= 2 and stats.read >= steps * 4
    assert {os.path.basename(n) for n in stats.bad_names} <= set(BAD_FILES)
    for b in full:
        assert b["image"].shape == (4, 24, 24, 3)  # batches stay full
        assert not set(names[b["index"]]) & {"empty.jpg", "notes.jpg"}  # replaced
    warned = [r.getMessage() for r in caplog.records if "skipped undecodable" in r.getMessage()]
    assert warned and all(any(f in w for f in BAD_FILES) for w in warned)
    resumed = stream(config, 3, steps - 3, with_index=True)
    assert_same(resumed, full[3:])


def test_too_many_bad_files_stop_with_one_line_naming_them(bad_folder):
    config = make_config("image_folder", folder=bad_folder, max_bad_fraction=0.001)
    it = data.pretrain_iterator(config, process_index=0, process_count=1)
    with pytest.raises(pipeline.BadDataError) as stopped:
        for _ in range(20):
            next(it)
    it.close()
    message = str(stopped.value)
    assert "\n" not in message and "data.max_bad_fraction=0.001" in message
    assert ".jpg" in message


class _Records:
    """A serialized source in memory: tf.Examples of small JPEGs, record 7 not a tf.Example."""

    serialized, paths = True, False

    def __init__(self, count: int):
        import io

        import tensorflow as tf
        from PIL import Image

        rng = np.random.default_rng(0)
        self.records = []
        for i in range(count):
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(jpeg, "JPEG")
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg.getvalue()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 3])),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            self.records.append(example.SerializeToString())
        # Raw bytes: TF's parse error quotes them, and its message is not valid UTF-8.
        self.records[7] = b"\x0a\xffnot an example"

    def __len__(self):
        return len(self.records)

    def read(self, indices):
        return [self.records[i] for i in indices], None

    def fetch(self, index):
        return self.records[index]

    def describe(self, index):
        return f"record[{index}]"


def test_a_record_that_is_no_example_is_skipped_like_a_bad_image():
    """Records are parsed a chunk at a time: a failed chunk is refilled row by row."""
    config = make_config("imagenet2012", batch_size=8)
    source = _Records(40)
    plan = pipeline.TrainPlan(0, len(source), 8, 0, 8)
    it = pipeline.Stream(
        config, source, plan, data.decoder("centre", 8), with_index=True, max_bad_fraction=0.5
    )
    batches = take(it, 10)  # two epochs: record 7 is met twice
    assert (it.stats.bad, it.stats.bad_names) == (2, ["record[7]", "record[7]"])
    index = np.concatenate([b["index"] for b in batches])
    assert 7 not in index and len(index) == 80  # replaced: the batches stay full
    planned = np.concatenate([streams.batch_indices(0, 40, 8, t) for t in range(10)])
    np.testing.assert_array_equal(index[planned != 7], planned[planned != 7])  # the rest in order


def test_eval_masks_a_bad_file_out(bad_folder):
    config = make_config("image_folder", folder=bad_folder)
    x, y = data.eval_arrays(config, "test")  # every 5th file of a class: some are bad
    n = len(data.folder_splits(bad_folder)[1]["test"][0])
    assert 0 < len(x) <= n and len(x) == len(y)


def test_an_in_memory_dataset_prepared_as_array_record_loads(tmp_path):
    """CIFAR prepared as the streamed datasets are (tfds serves ArrayRecord only randomly)."""
    registered = tfds.builder("cifar10")
    rng = np.random.default_rng(0)

    def examples(n):
        return [
            (
                str(i),
                {"id": str(i), "image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": 1},
            )
            for i in range(n)
        ]

    tfds.dataset_builders.store_as_tfds_dataset(
        name="cifar10",
        version=str(registered.version),
        features=registered.info.features,
        split_datasets={"train": examples(16), "test": examples(4)},
        data_dir=str(tmp_path),
        file_format="array_record",
    )
    config = make_config("cifar10", batch_size=8, data_dir=str(tmp_path), image_size=32)
    x, y = data.eval_arrays(config, "test")
    assert x.shape == (4, 32, 32, 3) and y.dtype == np.int32
    batch = next(data.pretrain_iterator(config, process_index=0, process_count=1, start_step=1))
    assert batch["image"].shape == (8, 32, 32, 3)
