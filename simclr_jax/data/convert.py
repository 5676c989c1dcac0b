"""Adds ArrayRecord files to a tfds dataset prepared as TFRecord, in one pass, in place.

    python -m simclr_jax.data.convert DATA_DIR/imagenet2012/5.1.0 [--workers=8]

Each TFRecord shard `NAME-SPLIT.tfrecord-XXXXX-of-YYYYY` is copied record for record (the
serialized examples, nothing decoded) to `NAME-SPLIT.array_record-XXXXX-of-YYYYY` beside it, and
`array_record` is added to the dataset's alternative file formats: tfds then serves the same
examples by random access (`tfds.data_source`). The TFRecord files are kept; delete them yourself
once the run reads the new ones. Shards already converted (same record count) are skipped, so a
conversion that stopped resumes. tfds's own `tfds convert_format` does the same but needs
apache-beam. Needs about as much free disk as the TFRecord files take.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from concurrent import futures

from simclr_jax.data.datasets import import_tf, import_tfds

# One record per group, as tfds writes them, so each reads on its own; uncompressed, since JPEG
# and PNG bytes do not compress and zstd's decompression cost ~6 us a record.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"


def _count(path: str) -> int:
    """Records in an ArrayRecord file (0 if unreadable: it is rewritten)."""
    from array_record.python import array_record_module

    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    except Exception:  # noqa: BLE001  (a partial file from a stopped conversion)
        return 0


def convert_shard(tfrecord: str, expected: int) -> str:
    """Writes the ArrayRecord twin of one TFRecord shard (atomically); returns its path."""
    from array_record.python import array_record_module

    tf = import_tf()
    target = tfrecord.replace(".tfrecord-", ".array_record-")
    if os.path.exists(target) and _count(target) == expected:
        return target
    partial = f"{target}.partial"
    writer = array_record_module.ArrayRecordWriter(partial, ARRAY_RECORD_OPTIONS)
    count = 0
    for record in tf.data.TFRecordDataset(tfrecord).as_numpy_iterator():
        writer.write(record)
        count += 1
    writer.close()
    if count != expected:
        os.remove(partial)
        raise ValueError(f"{tfrecord} holds {count} records; dataset_info.json says {expected}.")
    os.replace(partial, target)
    return target


def convert(version_dir: str, workers: int = 8) -> list[str]:
    """Converts every split of a tfds dataset version folder; returns the files written."""
    import_tfds()
    from tensorflow_datasets.core import dataset_info

    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        raise ValueError(
            f"{version_dir} has no dataset_info.json; pass a tfds version folder such as "
            "DATA_DIR/imagenet2012/5.1.0."
        )
    info = dataset_info.read_proto_from_builder_dir(version_dir)
    if info.file_format != "tfrecord":
        raise ValueError(
            f"{version_dir} is prepared as {info.file_format}, not tfrecord; nothing to convert."
        )
    jobs = []
    for split in info.splits:
        shards = sorted(glob.glob(os.path.join(version_dir, f"*-{split.name}.tfrecord-*")))
        if len(shards) != len(split.shard_lengths):
            raise ValueError(
                f"{version_dir}: split {split.name!r} has {len(shards)} TFRecord shards; "
                f"dataset_info.json lists {len(split.shard_lengths)}."
            )
        jobs += list(zip(shards, split.shard_lengths, strict=True))
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        written = list(pool.map(lambda job: convert_shard(*job), jobs))
    if "array_record" not in info.alternative_file_formats:
        info.alternative_file_formats.append("array_record")
        dataset_info.write_dataset_info_proto(info, dataset_info_dir=version_dir)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line: converts the version folders given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dirs", nargs="+", help="e.g. DATA_DIR/imagenet2012/5.1.0")
    parser.add_argument("--workers", type=int, default=8, help="shards converted at once")
    args = parser.parse_args(argv)
    for version_dir in args.version_dirs:
        try:
            written = convert(version_dir, args.workers)
        except ValueError as error:
            sys.exit(f"error: {error}")
        print(f"{version_dir}: {len(written)} ArrayRecord shards, array_record among its formats")


if __name__ == "__main__":
    main()
