"""What each `--mode` of the command line does, as functions of `(config, workdir)`."""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from simclr_jax.config.modes import MODE_NAMES

log = logging.getLogger(__name__)


def pretrain(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> dict[str, Any]:
    """Pretraining (resumed if `workdir` has checkpoints), then export, evaluation and report.

    Returns `{'state', 'eval', 'preempted'}`; after a preemption notice only the state.
    """
    import jax

    from simclr_jax import monitors
    from simclr_jax.pretrain import train

    out = train.train(config, workdir, allow_config_change)
    if out.preempted:
        return {"state": out.state, "eval": None, "preempted": True}
    is_main = jax.process_index() == 0
    if is_main and out.last_monitors is not None:
        print(monitors.format_monitors(*out.last_monitors), flush=True)
    train.export_run(config, out.state, workdir)
    results = None
    if config.eval.at_end:
        from simclr_jax.evals import end_of_run

        results = end_of_run.evaluate_run(config, out.model, out.state, out.mesh, workdir)
    if is_main:
        from simclr_jax.outputs import report

        print(f"run report: {report.write_report(workdir)}", flush=True)
    return {"state": out.state, "eval": results, "preempted": False}


def export(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> str:
    """Writes `workdir/export/` from the workdir's latest checkpoint."""
    from simclr_jax.pretrain import train

    state, _ = train.restore_for_inference(config, workdir)
    path = train.export_run(config, state, workdir)
    print(f"exported the encoder to {path}")
    return path


def linear_eval(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> Any:
    """SimCLR linear evaluation + kNN of an export (`init_from`) or of the workdir checkpoint."""
    from simclr_jax.evals import classifier
    from simclr_jax.evals import linear_eval as job

    if config.init_from:
        source = classifier.load_source(config, "linear_eval")
    else:
        from simclr_jax import checkpoint
        from simclr_jax.pretrain import train

        if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
            classifier.load_source(config, "linear_eval", " or a --workdir with checkpoints/")
        state, _ = train.restore_for_inference(config, workdir)
        source = classifier.source_from_state(config.model, state, os.path.abspath(workdir))
    return job.linear_eval(config, workdir, source, allow_config_change)


def finetune_mode(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> Any:
    """Fine-tunes an exported encoder (`init_from`) on all labels, a fraction or a subset."""
    from simclr_jax.evals import finetune

    return finetune.finetune(config, workdir, allow_config_change)


def distill_mode(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> Any:
    """SimCLR v2's distillation of a fine-tuned teacher (`distill.teacher`) into a student."""
    from simclr_jax.evals import distill

    return distill.distill(config, workdir, allow_config_change)


def export_torch_mode(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> dict[str, str]:
    """Converts an export (`init_from`, else `workdir/export`) to torchvision safetensors."""
    from simclr_jax import checkpoint
    from simclr_jax.interop import export_torch

    source = config.init_from or checkpoint.export_dir(workdir)
    # Beside a run's own export (workdir/export_torch); for an init_from export, in the workdir.
    out = None if not config.init_from else os.path.join(workdir, "export_torch")
    paths = export_torch.export_torch(source, out)
    print(f"wrote the PyTorch export of {source} to {os.path.dirname(paths['encoder'])}")
    return paths


def import_official_mode(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> str:
    """Writes `workdir/export/` from an official google-research/simclr TF checkpoint."""
    from simclr_jax.interop import official_import

    path = official_import.import_official(config, workdir)
    print(f"imported {config.init_from} into {path}")
    return path


def report_mode(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> str:
    """Writes `workdir/report/` (plots, evaluation table, index.html) from the run's files."""
    from simclr_jax.outputs import report

    path = report.write_report(workdir)
    print(f"wrote the report to {path}")
    return path


def preview_augment_mode(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> str:
    """Writes `workdir/report/augment.png`: source images and SimCLR views under `config`."""
    from simclr_jax.outputs import preview

    path = preview.preview_augment(config, workdir, seed=config.seed)
    print(f"wrote the augmentation preview to {path}")
    return path


# The entry point of each name in `config.modes.MODE_NAMES` (the one list of modes), in its order.
MODES = {
    "pretrain": pretrain,
    "linear_eval": linear_eval,
    "finetune": finetune_mode,
    "distill": distill_mode,
    "export": export,
    "export_torch": export_torch_mode,
    "import_official": import_official_mode,
    "report": report_mode,
    "preview_augment": preview_augment_mode,
}
if tuple(MODES) != MODE_NAMES:
    raise RuntimeError(f"modes.MODES {tuple(MODES)} differs from config.modes {MODE_NAMES}")


# The exit status of a run that saved a checkpoint and stopped on a preemption notice (SIGTERM,
# or JAX's preemption sync on several hosts): sysexits' EX_TEMPFAIL, "temporary failure, retry".
PREEMPTED_EXIT_STATUS = 75

# Modes that only read a run (a report of a run in progress, a preview) take no lock.
READ_ONLY_MODES = ("report", "preview_augment")


def run(mode: str, config: ml_collections.ConfigDict, workdir: str, allow_change: bool) -> Any:
    """Runs `mode` holding the workdir's lock; ValueError naming the modes for an unknown one."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not one of {list(MODE_NAMES)}")
    if mode in READ_ONLY_MODES:
        return MODES[mode](config, workdir, allow_change)
    from simclr_jax.runtime import parallel, workdir_lock

    parallel.maybe_initialize_distributed(config)
    with workdir_lock.hold(workdir, mode):
        return MODES[mode](config, workdir, allow_change)
