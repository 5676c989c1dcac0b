"""glibc malloc settings for the streamed pipeline: freed record buffers stay mapped for reuse.

The pipeline reads a chunk of records at a time (`pipeline.READ_CHUNK`: ~14 MB of ImageNet
JPEGs) and frees it at once after tf.data has copied it. glibc's default then hands the freed top
of the heap back to the kernel (its trim threshold is a few hundred KB at most), so the next chunk
faults every page in again: ~33 page faults per ImageNet-sized record against the old TFRecord
pipeline's ~5, ~3% of the host's CPU per image (`benchmarks/input_pipeline.py`, docs/data.md).
Keeping up to `TRIM_THRESHOLD` free at the top of each heap removes them; memory held stays the
pipeline's peak (workers x prefetch chunks), not the dataset's size.

tf.data sets the mmap threshold too: building the first `from_generator` iterator of a process
fixes it at 128 KiB (TensorFlow's mitigation of a Python 3.11 leak, tensorflow#65675), after
which every block over 128 KiB that a heap cannot hold (an image file's 1 MiB read buffer, a
decoded image) is mmapped and faulted in anew: ~30 page faults and two mmap/munmap pairs per
image of an image folder, ~7% of its CPU. So a stream applies these settings after building its
iterator, each time (two `mallopt` calls).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Free bytes glibc may keep at the top of a heap: above a few chunks in flight per reader thread.
TRIM_THRESHOLD = 64 << 20
# Setting the trim threshold turns off glibc's dynamic thresholds, whose mmap threshold would grow
# to 32 MiB (its ceiling on 64-bit) as large blocks are freed: set it there, or every record over
# the 128 KiB default would be mmapped and faulted in each time.
MMAP_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
# Settings a user made at start-up, which are kept.
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def applies(environ: Mapping[str, str], libc: str) -> bool:
    """Whether to set the thresholds: glibc, and no malloc setting of the user's in `environ`."""
    if libc != "glibc" or any(name in environ for name in _USER_SETTINGS):
        return False
    return "glibc.malloc." not in environ.get("GLIBC_TUNABLES", "")


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the settings do not apply (`applies`)."""
    if not applies(os.environ, platform.libc_ver()[0]):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Sets glibc's trim and mmap thresholds (again: tf.data may have reset the second); True if
    they were set here."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and done
    if not done:
        _warn_refused()
    return done


@functools.cache
def _warn_refused() -> None:
    """Logs, once per process, that glibc refused the settings."""
    log.warning("mallopt refused the trim/mmap thresholds; the input pipeline runs without")
