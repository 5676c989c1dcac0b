"""Orbax checkpoints of the train state: async keep-N saves, fallback restore, encoder export."""

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

from simclr_jax.runtime import parallel

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1


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
    (docs/benchmarks.md), for one host that writes every byte either way. TPU hosts keep
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


def _quarantine(workdir: str, step: int) -> str:
    """Moves an unreadable step folder out of orbax's way (never deletes it)."""
    src = os.path.join(checkpoint_dir(workdir), str(step))
    dst_root = os.path.join(os.path.abspath(workdir), "checkpoints_unreadable")
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    shutil.move(src, dst)
    return dst


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, workdir: str
) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest readable checkpoint as `(state, meta, step)`, or None if there is none.

    An unreadable checkpoint (truncated or corrupted files) is reported with its path, moved to
    `workdir/checkpoints_unreadable/`, and the previous one is tried.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        path = os.path.join(checkpoint_dir(workdir), str(step))
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 - any read failure means: try the previous one
            log.error("checkpoint %s cannot be restored (%s: %s)", path, type(e).__name__, e)
            if jax.process_index() == 0:
                moved = _quarantine(workdir, step)
                log.error("moved it to %s; falling back to the previous checkpoint", moved)
            manager.reload()
            continue
        return restored["state"], dict(restored["meta"]), step
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
    path: str, variables: dict[str, Any], model_config: dict[str, Any], source: dict[str, Any]
) -> str:
    """Writes encoder (+ projection head) variables with orbax and a JSON description to `path`.

    The JSON (`export.json`) holds the architecture, so loading needs nothing from the run.
    The export is written beside the target and swapped in, so a crash leaves the old one.
    """
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
        if os.path.exists(path):
            old = f"{path}.old-{int(time.time() * 1e6)}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)  # our own previous export, replaced by the new one
        else:
            os.rename(tmp, path)
    # No process may read the export (or end the run) before process 0 has swapped it in.
    parallel.barrier("simclr_jax.export_encoder")
    return path


def _same_on_all_processes(value: int) -> int:
    """Process 0's `value` on every process (all must name the same temporary folder)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


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
    try:
        variables = ocp.StandardCheckpointer().restore(os.path.join(path, "variables"))
    except Exception as e:
        raise CheckpointError(f"cannot read the export's variables in {path}: {e}") from e
    return variables, meta
