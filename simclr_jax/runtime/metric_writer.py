"""Writes training metrics to workdir/metrics.jsonl and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard when available."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        # Append: a resumed run continues the same file instead of overwriting its history.
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:
            log.warning("tensorboardX is not installed: TensorBoard events are not written")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Records `metrics` (numbers) at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        """Flushes and closes the files; a failing flush (a full disk) is logged, not raised.

        Closing runs in the jobs' `finally`, where raising would hide the error that stopped
        the run (e.g. the failed checkpoint save that a full disk caused first).
        """
        for name in ("_jsonl", "_tb"):
            f, _ = getattr(self, name), setattr(self, name, None)
            if f is None:
                continue
            try:
                f.close()
            except OSError as e:
                log.warning("closing the metrics (%s): %s", name.strip("_"), e)
