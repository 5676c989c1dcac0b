"""Time to the first batch of `data.pretrain_iterator` against the step a run resumes at.

    python benchmarks/resume.py --steps=0,1000,1000000 --repeats=3

Rows: an image folder of ImageNet-like JPEGs (`input_pipeline.write_image_folder`) and the same
images as a tfds dataset prepared as ArrayRecord (`imagenet2012` with its registered features,
written by `write_tfds`), each read with configs/imagenet.py (host crops, host_size 256). The
new pipeline (Grain on random-access sources) computes a step's indices in O(1); the old one
(tf.data: per-host shard, shuffle buffer, `skip(step * batch)`, kept here as `old_batches`) read
every record before the step, so it is timed at `--old_steps` only and its time at 10^6 is
extrapolated from the largest (linear in the step). Each figure is the median of `--repeats`
fresh iterators (creation, source opening and the first batch included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import input_pipeline  # noqa: E402


def write_tfds(folder: str) -> str:
    """The folder's train/val JPEGs as tfds `imagenet2012`, TFRecord and ArrayRecord; its data_dir.

    Prepared as TFRecord (what the old pipeline read), then converted in place with
    `simclr_jax.data.convert`, so both formats hold the same records. Reused when present.
    """
    from simclr_jax.data import convert, datasets

    tfds = datasets.import_tfds()
    data_dir = os.path.join(folder, "tfds")
    registered = tfds.builder("imagenet2012")
    version_dir = os.path.join(data_dir, "imagenet2012", str(registered.version))
    if os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        return data_dir
    _, splits = datasets.folder_splits(folder)

    def examples(split: str) -> list[tuple[str, dict[str, Any]]]:
        paths, labels = splits[split]
        return [
            (os.path.basename(p), {"image": p, "label": int(c), "file_name": os.path.basename(p)})
            for p, c in zip(paths, labels, strict=True)
        ]

    tfds.dataset_builders.store_as_tfds_dataset(
        name="imagenet2012",
        version=str(registered.version),
        features=registered.info.features,
        split_datasets={"train": examples("train"), "validation": examples("test")},
        data_dir=data_dir,
        file_format="tfrecord",
    )
    convert.convert(version_dir)
    return data_dir


# The old pipeline's record shuffle buffer: configs/imagenet.py's `data.shuffle_buffer` (a key
# removed since, as the whole-split permutation reads no buffer).
OLD_SHUFFLE_BUFFER = 50_000


def old_batches(config: Any, start_step: int = 0) -> Iterator[Any]:
    """The streamed pretraining pipeline before Grain (commit 3e10c00), one host.

    Files (or tfds TFRecord shards) in a seeded order, an `OLD_SHUFFLE_BUFFER` record shuffle,
    `skip(start_step * batch)` to resume, then the same decode as today's (`data.decode`); read
    from the files every epoch, as at ImageNet's size.
    """
    from simclr_jax.data import datasets, decode, streams

    tf = datasets.import_tf()
    seed = streams.host_seed(config.seed, 0)
    if config.dataset == "image_folder":
        paths, labels = datasets.folder_splits(config.data.folder)[1]["train"]
        records = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        load = tf.io.read_file
    else:
        tfds = datasets.import_tfds()
        records = datasets.tfds_builder(config).as_dataset(
            split="train",
            shuffle_files=True,
            decoders={"image": tfds.decode.SkipDecoding()},
            # tfds caches a split under 250 MiB in memory after its first pass (the benchmark's
            # 77 MB); ImageNet's 146 GB never is, so the old pipeline read its TFRecord files
            # every epoch, as here. Cached, it took ~0.15 ms less CPU per image.
            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
        )
        load = tf.identity
    size, host_size = config.data.image_size, config.data.host_size

    def prepare(position: Any, example: Any) -> dict[str, Any]:
        label = tf.cast(example["label"], tf.int32)
        image, boxes = decode.decode_union_resized(
            load(example["image"]), size, host_size, seed, position
        )
        return {"image": image, "crop": boxes, "label": label}

    ds = records.shuffle(OLD_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate().skip(start_step * config.batch_size)
    ds = ds.map(prepare, num_parallel_calls=2 * config.data.num_threads or tf.data.AUTOTUNE)
    ds = ds.batch(config.batch_size, drop_remainder=True).prefetch(1)
    batches = ds.with_options(streams.tf_options(config)).as_numpy_iterator()
    prefetch = config.data.prefetch
    return streams.Prefetcher(batches, prefetch) if prefetch else batches


def imagenet_config(source: str, folder: str, batch_size: int, threads: int) -> Any:
    """configs/imagenet.py on `source` ('image_folder' or 'imagenet2012') of the written images."""
    from configs import imagenet

    config = imagenet.get_config()
    config.batch_size, config.data.num_threads = batch_size, threads
    if source == "image_folder":
        config.dataset, config.data.folder = "image_folder", folder
    else:
        config.dataset, config.data.data_dir = "imagenet2012", write_tfds(folder)
    return config


def first_batch_s(make: Any, repeats: int) -> float:
    """Median seconds from calling `make()` to its iterator's first batch (after a warm-up).

    The warm-up takes what a process pays once (imports, tracing the decode) off every figure.
    """
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        batches = make()
        next(batches)
        if i:
            times.append(time.perf_counter() - start)
        if hasattr(batches, "close"):
            batches.close()
    return statistics.median(times)


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=256, help="JPEGs written (train split)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="config.data.num_threads")
    p.add_argument("--steps", default="0,1000,1000000", help="resume steps of the new pipeline")
    p.add_argument("--old_steps", default="0,1000", help="resume steps of the old one ('' none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", default=None, help="where to write the images (default: temp)")
    p.add_argument("--jpeg_size", type=input_pipeline._size, default=input_pipeline.DEFAULT_SIZE)
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Writes the images and the tfds dataset, times the first batches, prints the table."""
    from simclr_jax import data

    args = parser().parse_args(argv)
    width, height = args.jpeg_size
    folder = args.folder or os.path.join(tempfile.gettempdir(), f"simclr_jax_resume_{width}")
    input_pipeline.write_image_folder(folder, args.num_images, width=width, height=height)
    steps = [int(s) for s in args.steps.split(",") if s]
    old_steps = [int(s) for s in args.old_steps.split(",") if s]
    rows = []
    for source in ("image_folder", "imagenet2012"):
        config = imagenet_config(source, folder, args.batch_size, args.threads)
        label = "image_folder" if source == "image_folder" else "imagenet2012 ArrayRecord"
        row: dict[str, Any] = {"source": label, "pipeline": "new (Grain)"}
        for step in steps:

            def make(step: int = step, config: Any = config) -> Iterator[Any]:
                return data.pretrain_iterator(
                    config, process_index=0, process_count=1, start_step=step
                )

            row[f"step {step:,}"] = first_batch_s(make, args.repeats)
        if len(steps) > 1:
            row["last / first"] = row[f"step {steps[-1]:,}"] / row[f"step {steps[0]:,}"]
        rows.append(row)
        if old_steps:
            old_label = "image_folder" if source == "image_folder" else "imagenet2012 TFRecord"
            old: dict[str, Any] = {"source": old_label, "pipeline": "old (tf.data skip)"}
            for step in old_steps:
                old[f"step {step:,}"] = first_batch_s(
                    lambda step=step, config=config: old_batches(config, step), args.repeats
                )
            base, last = old[f"step {old_steps[0]:,}"], old[f"step {old_steps[-1]:,}"]
            if old_steps[-1] > old_steps[0]:
                rate = (last - base) / (old_steps[-1] - old_steps[0])  # s per step skipped
                old["step 10^6 (extrapolated)"] = base + rate * 10**6
            rows.append(old)
    print(
        f"\nseconds to the first batch (median of {args.repeats}); batch {args.batch_size}, "
        f"{args.threads} decode threads, {args.num_images} JPEGs {width}x{height}; "
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs\n"
    )
    input_pipeline.print_table(rows)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
