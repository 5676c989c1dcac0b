"""Orbax checkpoints of the train state: async keep-N saves, checked fallback restore, export.

A restore first compares the checkpoint's saved tree (paths, shapes, dtypes; array headers only)
with the state the run expects: a mismatch (another architecture, optimizer, method or device
count) stops the run and touches no checkpoint. Only files that cannot be read, after retries,
make a checkpoint move to `checkpoints_unreadable/` (never deleted) and the previous one be tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# 2: every `model` key is written. Version-1 exports predate three keys; their meaning then is
# the value below (plain torchvision-layout ResNets, heads whose last BN had a scale).
EXPORT_FORMAT_VERSION = 2
_V1_MODEL_DEFAULTS = {"sk_ratio": 0.0, "compat": "torchvision", "head_out_scale": True}

# Reads of one checkpoint before it counts as unreadable, and the pause before the n-th retry
# (n times this): a cloud bucket's transient errors pass within seconds. Tests set it to 0.
RESTORE_ATTEMPTS = 3
RESTORE_RETRY_DELAY_S = 2.0
# Differing leaves named in a mismatch error; the rest are counted.
_MISMATCHES_SHOWN = 3

# Outcomes of one restore attempt, ordered so that the worst over all processes decides.
_OK, _UNREADABLE, _MISMATCH, _FAILED = 0, 1, 2, 3


class CheckpointError(RuntimeError):
    """A checkpoint or export that cannot be read; the message names the path."""


def checkpoint_dir(workdir: str) -> str:
    """Absolute path of the run's orbax checkpoint folder."""
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _save_each_array_from_one_replica_on_cpu() -> None:
    """On CPU, saves each replicated array from its first replica, as orbax does on GPU.

    Orbax's default elsewhere (replica-parallel saving) cuts every replicated array into one
    slice per device with eager `slice` ops, each compiled per shape and device: the first
    save of the tiny test state over 8 CPU devices took 5.7 s against 0.4 s this way
    (docs/benchmarks_history.md), for one host that writes every byte either way. TPU hosts keep
    orbax's default, where the slices spread the writes over hosts.
    """
    if jax.default_backend() != "cpu":
        return
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_use_replica_parallel", True) is False:
        return
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=getattr(current, "_array_metadata_store", None),
    )
    absl_log = logging.getLogger("absl")  # orbax warns of the override it was asked for
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)


def create_manager(
    workdir: str, *, keep: int = 3, keep_period: int = 0, async_save: bool = True
) -> ocp.CheckpointManager:
    """Orbax manager that keeps the newest `keep` steps (plus multiples of `keep_period`).

    Orbax writes each step into a temporary folder and renames it when complete, so a crash
    mid-write never leaves a step folder that restores wrong.
    """
    _save_each_array_from_one_replica_on_cpu()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=True,
        # Half-written temporary folders of a killed save are never valid checkpoints.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "meta")
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any], force: bool = False
) -> bool:
    """Starts an (async) save of `state` and JSON `meta` at `step`; returns whether it saved."""
    return manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


def _barrier(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (a no-op in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _worst_on_any_process(outcome: int) -> int:
    """The highest `outcome` over all processes, so that every process takes the same branch."""
    if jax.process_count() == 1:
        return outcome
    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _step_dir(workdir: str, step: int) -> str:
    """Absolute path of checkpoint `step`'s folder."""
    return os.path.join(checkpoint_dir(workdir), str(step))


def _quarantine(workdir: str, step: int) -> str:
    """Moves an unreadable step folder out of orbax's way (never deletes it)."""
    src = _step_dir(workdir, step)
    dst_root = os.path.join(os.path.abspath(workdir), "checkpoints_unreadable")
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    shutil.move(src, dst)
    return dst


def _quarantine_on_all_processes(workdir: str, step: int) -> None:
    """Process 0 moves checkpoint `step` aside once no process reads it; all wait for the move."""
    _barrier(f"simclr_jax.checkpoint.quarantine_{step}_start")
    if jax.process_index() == 0:
        moved = _quarantine(workdir, step)
        log.error("moved it to %s; falling back to the previous checkpoint", moved)
    # No process may list the steps (manager.reload) before the folder is gone.
    _barrier(f"simclr_jax.checkpoint.quarantine_{step}_done")


def _key_name(key: Any) -> str:
    """A tree path entry as orbax names it: dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _dtype_name(dtype: Any) -> str | None:
    """`dtype` as one comparable string (None where the leaf has none)."""
    if dtype is None:
        return None
    try:
        return str(np.dtype(dtype))
    except TypeError:  # typed PRNG keys and other extended dtypes
        return str(dtype)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...] | None, str | None]]:
    """`{'params.head.kernel': (shape, dtype)}` of every leaf of a state or of saved metadata.

    Orbax saves dataclasses and named tuples as dicts, so paths are compared by their names.
    """
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        specs[".".join(_key_name(k) for k in path)] = (
            None if shape is None else tuple(shape),
            _dtype_name(getattr(leaf, "dtype", None)),
        )
    return specs


def _describe(spec: tuple[tuple[int, ...] | None, str | None]) -> str:
    """'(128, 64) float32' of a leaf's (shape, dtype)."""
    return " ".join(str(x) for x in spec if x is not None) or "?"


def _differences(saved: Any, expected: Any) -> list[str]:
    """What differs between the saved tree's metadata and the expected (abstract) state."""
    have, want = _leaf_specs(saved), _leaf_specs(expected)
    diffs = []
    for path, spec in want.items():
        if path not in have:
            diffs.append(f"{path} not saved, expected {_describe(spec)}")
            continue
        pairs = zip(have[path], spec, strict=True)
        if any(a is not None and b is not None and a != b for a, b in pairs):
            diffs.append(f"{path} saved {_describe(have[path])}, expected {_describe(spec)}")
    diffs += [
        f"{path} saved {_describe(spec)}, not expected"
        for path, spec in have.items()
        if path not in want
    ]
    return diffs


def _mismatch_message(path: str, diffs: list[str]) -> str:
    """One line: which checkpoint, the first differing leaves, and what to do."""
    shown = "; ".join(diffs[:_MISMATCHES_SHOWN])
    more = f"; and {len(diffs) - _MISMATCHES_SHOWN} more" if len(diffs) > _MISMATCHES_SHOWN else ""
    return (
        f"checkpoint {path} holds a different state than this run builds (another "
        f"architecture, optimizer, method or device count): {shown}{more}. No checkpoint was "
        "moved or deleted: resume with the config it was saved with, or use another --workdir."
    )


def _is_out_of_memory(e: Exception) -> bool:
    """Whether a restore failed for want of memory (the files may be fine)."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def _elsewhere(path: str, outcome: int) -> str:
    """The message of a process whose own attempt went fine while another process's did not."""
    if outcome == _MISMATCH:
        return _mismatch_message(path, ["another process found it (see that process's log)"])
    what = "ran out of memory restoring" if outcome == _FAILED else "cannot read"
    return f"another process {what} it"


def _read_step(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """Checkpoint `step` read as `(state, meta)` by this process alone.

    Orbax's handlers hold no barrier; `manager.restore` ends with one, where the other processes
    would wait for a process whose read failed, then pair its next collective with the wrong one.
    """
    step_dir = manager.directory / str(step)
    handler = ocp.StandardCheckpointHandler()
    try:
        state = handler.restore(step_dir / "state", args=ocp.args.StandardRestore(abstract_state))
    finally:
        handler.close()
    return state, dict(ocp.JsonCheckpointHandler().restore(step_dir / "meta"))


def _restore_once(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, path: str
) -> tuple[int, tuple[Any, dict[str, Any]] | None, str]:
    """One attempt, agreed on by all processes: `(outcome, (state, meta) or None, message)`.

    Every process runs the same two collectives whatever fails, so none waits for another.
    """
    outcome, message = _OK, ""
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = handler.metadata(manager.directory / str(step) / "state")
    except Exception as e:  # noqa: BLE001 - a metadata file that cannot be read
        outcome, message = _UNREADABLE, f"{type(e).__name__}: {e}"
    else:
        diffs = _differences(saved, abstract_state)
        if diffs:
            outcome, message = _MISMATCH, _mismatch_message(path, diffs)
    finally:
        handler.close()
    # All processes read the arrays, or none.
    outcome = _worst_on_any_process(outcome)
    if outcome != _OK:
        return outcome, None, message or _elsewhere(path, outcome)
    restored = None
    try:
        restored = _read_step(manager, step, abstract_state)
    except Exception as e:  # noqa: BLE001 - classified here; the caller decides
        outcome = _FAILED if _is_out_of_memory(e) else _UNREADABLE
        message = f"{type(e).__name__}: {e}"
    outcome = _worst_on_any_process(outcome)
    return outcome, restored, message or _elsewhere(path, outcome)


def _restore_with_retries(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, workdir: str
) -> tuple[Any, dict[str, Any]] | None:
    """Checkpoint `step` restored, or None when its files stay unreadable over every attempt.

    A checkpoint of another state, or a restore out of memory, raises CheckpointError.
    """
    path = _step_dir(workdir, step)
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        if attempt > 1:
            time.sleep(RESTORE_RETRY_DELAY_S * (attempt - 1))
        outcome, restored, message = _restore_once(manager, step, abstract_state, path)
        if outcome == _OK:
            return restored
        if outcome == _MISMATCH:
            raise CheckpointError(message)
        if outcome == _FAILED:
            raise CheckpointError(
                f"cannot restore checkpoint {path}: out of memory ({message.splitlines()[0]}); "
                "no checkpoint was moved: free memory or restore it on a larger machine"
            )
        log.warning(
            "checkpoint %s cannot be read (attempt %d of %d): %s",
            path,
            attempt,
            RESTORE_ATTEMPTS,
            message,
        )
    log.error("checkpoint %s cannot be restored (%s)", path, message)
    return None


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, workdir: str
) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest readable checkpoint as `(state, meta, step)`, or None if there is none.

    A checkpoint saved for another state (changed architecture, optimizer, method or device
    count) raises CheckpointError and nothing is moved. One whose files cannot be read after
    `RESTORE_ATTEMPTS` tries is reported with its path, moved to `workdir/checkpoints_unreadable/`,
    and the previous one is tried.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        restored = _restore_with_retries(manager, step, abstract_state, workdir)
        if restored is not None:
            return *restored, step
        _quarantine_on_all_processes(workdir, step)
        manager.reload()
    if steps:
        raise CheckpointError(
            f"none of the checkpoints {steps} in {checkpoint_dir(workdir)} can be restored; "
            "they were moved to checkpoints_unreadable/. Start a fresh run in a new --workdir "
            "or repair them."
        )
    return None


def export_dir(workdir: str) -> str:
    """Absolute path of the run's encoder export."""
    return os.path.abspath(os.path.join(workdir, "export"))


def export_encoder(
    path: str,
    variables: dict[str, Any],
    model_config: dict[str, Any],
    source: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> str:
    """Writes encoder (+ projection head) variables with orbax and a JSON description to `path`.

    The JSON (`export.json`) holds the architecture, so loading needs nothing from the run.
    `extra_files` `{name: existing file}` are copied in beside it (a text encoder's
    `tokenizer.json`). The export is written beside the target and swapped in, so a crash
    leaves the old one.
    """
    missing = sorted(set(_V1_MODEL_DEFAULTS) - set(model_config))
    if missing:  # format 2 states every key (format 1 left these to defaults)
        raise ValueError(f"export_encoder: the model description lacks {missing}")
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{_same_on_all_processes(int(time.time() * 1e6) % 10**9)}"
    _save_each_array_from_one_replica_on_cpu()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "variables"), variables)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        meta = {
            "format_version": EXPORT_FORMAT_VERSION,
            "model": model_config,
            "source": source,
        }
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        if os.path.exists(path):
            old = f"{path}.old-{int(time.time() * 1e6)}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)  # our own previous export, replaced by the new one
        else:
            os.rename(tmp, path)
    # No process may read the export (or end the run) before process 0 has swapped it in.
    _barrier("simclr_jax.export_encoder")
    return path


def _same_on_all_processes(value: int) -> int:
    """Process 0's `value` on every process (all must name the same temporary folder)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _migrate_export_meta(meta: dict[str, Any], path: str) -> dict[str, Any]:
    """An export's description in the current format (older ones filled in, newer refused)."""
    version = int(meta.get("format_version", 1))
    if version > EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in export format {version} by a newer simclr_jax; this version "
            f"reads formats up to {EXPORT_FORMAT_VERSION}: upgrade simclr_jax to read it"
        )
    if version < 2:
        meta = {**meta, "model": {**_V1_MODEL_DEFAULTS, **meta["model"]}}
    return {**meta, "format_version": EXPORT_FORMAT_VERSION}


def load_export(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads an export as `(variables, description)`; numpy-backed, no mesh needed."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, "export.json")
    if not os.path.exists(meta_path):
        raise CheckpointError(
            f"{path} is not a simclr_jax export (no export.json); point --config.init_from at "
            "the export/ folder of a pretraining run, or create one with --mode=export"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    meta = _migrate_export_meta(meta, path)
    try:
        variables = ocp.StandardCheckpointer().restore(os.path.join(path, "variables"))
    except Exception as e:
        raise CheckpointError(f"cannot read the export's variables in {path}: {e}") from e
    return variables, meta
