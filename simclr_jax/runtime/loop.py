"""Parts every training run's loop shares (pretraining and the downstream jobs alike).

Preemption handling, cadence, the saved config and its resume check, host metrics and the
device-batch prefetcher: a loop is these plus its own jitted step and checkpoint manager.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import config_base
from simclr_jax.runtime import parallel

log = logging.getLogger(__name__)


class Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if jax.process_count() > 1:
            # Multi-host: JAX's preemption service catches SIGTERM on any host and orbax's
            # reached_preemption() stops every process at the same step. A local flag would make
            # one process save (a collective) alone and deadlock the others.
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def itstime(step: int, every: int, total: int) -> bool:
    """True every `every` steps and always at the last step."""
    return step == total or (every > 0 and step % every == 0)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `workdir/config.json`, keeping any previous one as `config.<time>.json`."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
        os.rename(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
    with open(path, "w") as f:
        f.write(text)


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, allow_change: bool
) -> None:
    """Refuses to resume a workdir whose saved config differs in keys that change the run."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    diffs = config_base.config_diff(saved, json.loads(config.to_json_best_effort()))
    if diffs and not allow_change:
        lines = "\n  ".join(diffs)
        raise ValueError(
            f"{workdir} holds a run with a different config; resuming would change it:\n  {lines}\n"
            "Use another --workdir, or pass --allow_config_change to resume anyway."
        )


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """A step's metrics as Python floats (one device-to-host transfer)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def device_batches(
    it: Iterator[dict[str, np.ndarray]], mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
    """Global device batches, one placed ahead so the transfer overlaps the running step."""
    nxt = parallel.host_to_global(next(it), mesh)
    while True:
        cur = nxt
        nxt = parallel.host_to_global(next(it), mesh)
        yield cur


_CACHE: dict[Any, Any] = {}


def cached(key: Any, make: Callable[[], Any]) -> Any:
    """`make()` built once per hashable `key` in this process (e.g. a jitted step).

    Downstream runs build their jitted functions through this, so runs with the same model and
    settings in one process (random-init and pretrained evaluation, a resumed test run) share
    one compilation instead of tracing and compiling fresh closures each time.
    """
    if key not in _CACHE:
        if len(_CACHE) >= 128:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]
