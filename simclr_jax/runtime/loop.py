"""The one run loop every training job drives: pretraining, linear evaluation and fine-tuning.

A job builds its jitted step, state, checkpoint manager and metric writer and describes them in a
`Run`; `run` then owns the cadence (logging, checkpoints, hooks), the health checks (loss, gradient
and update norms finite), throughput, progress, preemption and the final checkpoint. Checkpoints
hold the data position (`data_step`): a resumed run reads its batches from that step in O(1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simclr_jax import checkpoint
from simclr_jax.runtime import parallel
from simclr_jax.runtime.metric_writer import MetricWriter

log = logging.getLogger(__name__)

# Metrics whose non-finite value stops a run: a NaN/Inf here poisons every later step.
HEALTH_METRICS = ("loss", "grad_norm", "update_norm")

Step = Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]


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


def with_update_norm(step: Callable[..., Any]) -> Callable[..., Any]:
    """`step` that also reports `update_norm`, the L2 norm of the change of `state.params`.

    Measured on the params themselves, so it covers every method's update (optimizer, EMA-free
    parts, clipping) without each step computing it; used by the loop's health check.
    """

    def checked(state: Any, *args: Any) -> tuple[Any, dict[str, jax.Array]]:
        new_state, metrics = step(state, *args)
        delta = jax.tree.map(lambda a, b: a - b, new_state.params, state.params)
        return new_state, {**metrics, "update_norm": optax.tree.norm(delta)}

    # Compile logs and profiles name the step itself (`jit(train_step)`), not this wrapper.
    inner = getattr(step, "func", step)  # a functools.partial's function
    checked.__name__ = checked.__qualname__ = getattr(inner, "__name__", "step")
    return checked


@dataclasses.dataclass
class Run:
    """What `run` drives: a jitted step over device batches from a start step to `total_steps`."""

    name: str  # the job ('pretrain', 'linear_eval', 'finetune', 'eval'): progress and messages
    step_fn: Step  # jitted (state, device batch) -> (state, metrics incl. HEALTH_METRICS)
    host_batches: Callable[[], Iterator[dict[str, np.ndarray]]]  # from the start step on
    mesh: Mesh
    total_steps: int
    steps_per_epoch: int
    batch_size: int  # global examples per step (images/s)
    log_every: int
    checkpoint_every: int
    writer: MetricWriter
    hint: str  # what to change when the loss diverges, e.g. 'lower optim.base_lr'
    manager: Any = None  # orbax CheckpointManager (None: nothing is saved)
    # More steps whose metrics are written (besides log_every), e.g. the monitor cadence.
    also_log_every: int = 0
    # (step, host metrics) -> the metrics to write; e.g. drops monitors on non-monitor steps.
    on_metrics: Callable[[int, dict[str, float]], dict[str, float]] | None = None
    # (every, fn(step, state)): called on multiples of `every` before the last step (evaluations).
    hooks: Sequence[tuple[int, Callable[[int, Any], None]]] = ()
    show: dict[str, str] = dataclasses.field(default_factory=lambda: {"loss": "loss"})
    progress: bool = True


@dataclasses.dataclass
class Outcome:
    """Where a run stopped: the state, its step, and whether a preemption notice stopped it."""

    state: Any
    step: int
    preempted: bool


def _last_good_checkpoint(manager: Any, before: int) -> str:
    """The newest checkpoint at or before step `before`, for the divergence message."""
    steps = [s for s in (manager.all_steps() if manager is not None else []) if s <= before]
    if not steps:
        return "no checkpoint before it"
    path = os.path.join(str(manager.directory), str(max(steps)))
    return f"the last checkpoint before it is step {max(steps)} ({path})"


def check_health(r: Run, m: dict[str, float], step: int, last_good: int) -> None:
    """Raises FloatingPointError naming the first non-finite health metric at `step`."""
    for key in HEALTH_METRICS:
        if key in m and not math.isfinite(m[key]):
            raise FloatingPointError(
                f"{r.name}: {key} is {m[key]} at step {step} (first non-finite in steps "
                f"{last_good + 1}..{step}); {_last_good_checkpoint(r.manager, last_good)}; "
                f"{r.hint}"
            )


def _os_error(e: BaseException) -> OSError | None:
    """The first OSError in `e`'s chain (orbax wraps the background writer's error)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _save_failed(r: Run, e: BaseException) -> checkpoint.CheckpointError:
    """The one-line error for a failed save: the folder and the OS error behind it."""
    os_err = _os_error(e)
    if os_err is None:
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    else:
        where = f" ({os_err.filename})" if os_err.filename else ""
        reason = f"{os_err.strerror or os_err}{where}"
    return checkpoint.CheckpointError(
        f"{r.name}: saving a checkpoint in {r.manager.directory} failed: {reason}; the run "
        "stopped, the checkpoints saved before it are intact (free space or fix the folder, "
        "then rerun to resume)"
    )


def _checked_saves(r: Run, what: Callable[[], Any]) -> Any:
    """Runs a checkpoint call; a failed (possibly earlier, asynchronous) save becomes one line."""
    try:
        return what()
    except Exception as e:  # noqa: BLE001 - every failure of a save stops the run the same way
        raise _save_failed(r, e) from e


def _agree_saves_succeeded(r: Run) -> None:
    """Several processes: all stop together if any one's earlier asynchronous save failed.

    Called before each save (orbax reports a failed background write by then), so the check
    costs one small all-gather per checkpoint, not one per step; a process that stopped alone
    would leave the others waiting in the next collective.
    """
    error = None
    try:
        r.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - reported below, once all processes know
        error = e
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise _save_failed(r, error) from error
    if failed.any():
        raise checkpoint.CheckpointError(
            f"{r.name}: saving a checkpoint in {r.manager.directory} failed on process(es) "
            f"{np.flatnonzero(failed).tolist()} (their log names the OS error); the run stopped, "
            "the checkpoints saved before it are intact"
        )


def _take_over_bad_files(host_iter: Any) -> Any:
    """The host batches' `StreamStats` (streamed data), or None; several processes decide here.

    Each process skips the undecodable files of its own rows; whether too many are bad is
    decided on the counts summed over all processes (`_bad_files`), so every process stops at
    the same step with the same line instead of one stopping alone and leaving the others
    waiting in their next collective. Called before the first batch is taken.
    """
    stats = getattr(host_iter, "stats", None)
    if stats is not None:
        stats.keep_history = True  # the counts of the batches taken, for `skipped_files`
        stats.decide_locally = jax.process_count() == 1
    return stats


def _bad_files(r: Run, stats: Any, start: int, step: int) -> int:
    """Files skipped as undecodable in the batches of steps [start, step) on every process.

    Several processes agree (one small all-gather, on log and save steps only): more than
    `data.max_bad_fraction` bad of all they read stops every one of them with the same line.
    """
    mine = stats.through(step - start)
    if stats.decide_locally:  # one process: the stream decides as it reads
        return mine.bad
    return agree_on_bad_files(r.name, mine, f"at step {step}")


def agree_on_bad_files(name: str, mine: Any, where: str) -> int:
    """The files skipped by all processes, given this one's `StreamStats`; a collective.

    Too many bad of all that was read stops every process with the same line (naming the
    first bad files in process order), where a process deciding alone would leave the others
    waiting in their next collective.
    """
    summaries = parallel.gather_json(mine.summary())
    total = type(mine).summed(summaries, mine.max_fraction)
    if total.over_limit():
        try:
            total.check()
        except ValueError as e:
            raise type(e)(
                f"{name}: stopped {where} on all {len(summaries)} processes: {e}"
            ) from None
    return total.bad


def finish_eval_stream(name: str, batches: Any) -> None:
    """After a pass over an eval stream: close it; several processes agree on its bad files.

    One process has checked them as it read (`labelled.eval_batches`); several pass their
    counts here after the pass, which every process ends at the same batch.
    """
    if hasattr(batches, "close"):
        batches.close()
    stats = getattr(batches, "stats", None)
    if stats is not None and not stats.decide_locally:
        agree_on_bad_files(name, stats, "after its pass over the split")


def close_manager(manager: Any) -> None:
    """Closes a checkpoint manager; an error already reported (a failed save) is not re-raised."""
    if manager is None:
        return
    try:
        manager.close()
    except Exception as e:  # noqa: BLE001 - the loop has raised the one-line error for it
        log.warning("closing the checkpoint manager: %s", " ".join(str(e).split())[:200])


def _save(r: Run, step: int, state: Any) -> None:
    if jax.process_count() > 1:
        _agree_saves_succeeded(r)
    meta = {"step": step, "data_step": step}
    _checked_saves(r, lambda: checkpoint.save(r.manager, step, state, meta))


def run(r: Run, state: Any, start_step: int) -> Outcome:
    """Steps `state` from `start_step` to `r.total_steps`; checkpoints, logs and stops cleanly.

    A non-finite loss, gradient norm or update norm stops the run with FloatingPointError before
    anything later is saved: metrics are checked on every logged step and before every save.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=r.total_steps,
        initial=start_step,
        disable=not (r.progress and jax.process_index() == 0),
        unit="step",
        dynamic_ncols=True,
        desc=r.name,
    )
    step, preempted, host_iter, stats = start_step, False, None, None
    # step_ok: the last step whose health metrics were checked; step_logged: for images/s.
    t_last, step_ok, step_logged = time.perf_counter(), start_step, start_step
    try:
        if step < r.total_steps:
            host_iter = r.host_batches()
            stats = _take_over_bad_files(host_iter)
            batches = device_batches(host_iter, r.mesh)
        with Preemption() as preemption:
            while step < r.total_steps:
                if r.manager is not None and jax.process_count() == 1:
                    # An asynchronous save that failed stops the run now (several processes
                    # agree on it before their next save instead: `_agree_saves_succeeded`).
                    _checked_saves(r, r.manager.check_for_errors)
                state, metrics = r.step_fn(state, next(batches))
                step += 1
                bar.update(1)
                preempted = preemption.requested or (
                    r.manager is not None and r.manager.reached_preemption(step)
                )
                save = r.manager is not None and (
                    preempted or itstime(step, r.checkpoint_every, r.total_steps)
                )
                log_now = itstime(step, r.log_every, r.total_steps) or itstime(
                    step, r.also_log_every, r.total_steps
                )
                if save or log_now:
                    m = host_metrics(metrics)
                    check_health(r, m, step, step_ok)
                    step_ok = step
                    if stats is not None:  # streamed data: bad files skipped, in all processes
                        m["skipped_files"] = float(_bad_files(r, stats, start_step, step))
                if log_now:
                    if r.on_metrics is not None:
                        m = r.on_metrics(step, m)
                    now = time.perf_counter()
                    m["images_per_sec"] = (step - step_logged) * r.batch_size / (now - t_last)
                    m["epoch"] = step / r.steps_per_epoch
                    t_last, step_logged = now, step
                    r.writer.write(step, m)
                    bar.set_postfix(**{k: f"{m[v]:.3g}" for k, v in r.show.items() if v in m})
                for every, hook in r.hooks:
                    if every and step < r.total_steps and step % every == 0:
                        hook(step, state)
                if save:
                    _save(r, step, state)
                if preempted:
                    log.warning("%s stopped at step %d (preemption); rerun to resume", r.name, step)
                    break
        if r.manager is not None:
            if not preempted and r.manager.latest_step() != r.total_steps:
                _save(r, r.total_steps, state)
            _checked_saves(r, r.manager.wait_until_finished)
    finally:
        bar.close()
        if host_iter is not None and hasattr(host_iter, "close"):
            host_iter.close()
    return Outcome(state, step, preempted)
