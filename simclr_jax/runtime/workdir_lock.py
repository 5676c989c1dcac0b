"""One run per workdir: an OS file lock that process 0 holds for the whole run.

`fcntl.flock` on `WORKDIR/.simclr_jax.lock` is released by the kernel when its process dies, so
a lock file left by a killed run is stale by construction: the next run takes it over (saying
whose it was) instead of waiting for someone to delete it. A second live run is refused in one
line naming the holder before it writes anything, so the checkpoint manager's start-up clean-up
of temporary folders never runs beside a live writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_NAME = ".simclr_jax.lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir; the message names it."""


def _holder_text(info: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (
        f"--mode={info.get('mode', '?')} run, PID {info.get('pid', '?')} on host "
        f"{info.get('host', '?')}, started {started}"
    )


def _read_holder(f: Any) -> dict[str, Any]:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


class WorkdirLock:
    """Holds `workdir`'s lock from `acquire` until `release` (or the process's death)."""

    def __init__(self, workdir: str, mode: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.mode = mode
        self._file: Any = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock; raises WorkdirLockedError naming the live holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(f)
            f.close()
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by a {_holder_text(holder)}; wait for "
                "it to end or use another --workdir (nothing was changed)"
            ) from None
        previous = _read_holder(f)
        if previous:
            log.warning(
                "took over the lock of %s from a %s that is no longer running",
                os.path.dirname(self.path),
                _holder_text(previous),
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        f.seek(0)
        f.truncate()
        f.write(json.dumps({**info, "mode": self.mode}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Empties and unlocks the lock file (an empty file is no one's lock)."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str, mode: str) -> Iterator[None]:
    """Process 0 holds `workdir`'s lock for the block; if it is taken every process is refused."""
    lock, error = None, ""
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir, mode).acquire()
        except WorkdirLockedError as e:
            error = str(e)
    if jax.process_count() > 1:
        # All processes must leave together: a refusal on process 0 alone would hang the others.
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(error))))
        if refused and not error:
            error = f"{os.path.abspath(workdir)} is in use by another run (process 0 holds no lock)"
    if error:
        raise WorkdirLockedError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
