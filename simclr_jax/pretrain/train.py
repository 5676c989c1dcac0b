"""The pretraining job: a registered method's step in the run loop, resumable, then exported.

The job knows no method by name (`pretrain.state` builds whatever `config.method` registers).
What follows a finished run (export, end-of-run evaluation, report) is `simclr_jax.modes`'.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from simclr_jax import checkpoint, config_base, data, methods, models, monitors, optim
from simclr_jax.methods.state import TrainState
from simclr_jax.pretrain.state import (
    abstract_train_state,
    compile_train_step,
    create_train_state,
    model_and_optimizer,
)
from simclr_jax.runtime import loop, parallel
from simclr_jax.runtime.metric_writer import MetricWriter

log = logging.getLogger(__name__)

JOB = "pretrain"


@dataclasses.dataclass
class Pretrained:
    """A pretraining run's end: its state and network, the mesh, and whether it was preempted."""

    state: TrainState
    model: Any
    mesh: Mesh
    preempted: bool
    last_monitors: tuple[int, dict[str, float]] | None = None


def _log_resolved(config: ml_collections.ConfigDict, total_steps: int, n_train: int) -> None:
    """Logs the method's run-length-dependent settings (warnings as warnings)."""
    for line in methods.get(config.method).resolve(config, total_steps, n_train):
        if line.startswith("WARNING: "):
            log.warning(line.removeprefix("WARNING: "))
        else:
            log.info(line)


def train(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> Pretrained:
    """Pretrains `config.method` in the run loop, resuming from `workdir`'s checkpoints."""
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    info = data.dataset_info(config)
    n_train = info.num_train_examples
    steps_per_epoch = max(n_train // config.batch_size, 1)
    total_steps = optim.total_train_steps(config, steps_per_epoch)
    _log_resolved(config, total_steps, n_train)
    model, tx, schedule = model_and_optimizer(config, info.num_classes, steps_per_epoch)
    config_base.check_resume(config, workdir, JOB, allow_config_change)
    recorded = config  # config.json: what the user wrote (a resolved data.tokenizer is not)
    config, tokenizer = text_tokenizer(config, workdir)
    manager = checkpoint.create_manager(
        workdir, keep=config.keep_checkpoints, keep_period=config.keep_period
    )
    writer = MetricWriter(workdir)
    try:
        abstract = abstract_train_state(config, model, tx, mesh, n_train)
        restored = checkpoint.restore_latest(manager, abstract, workdir)
        if restored is None:
            state, start = create_train_state(config, model, tx, mesh, n_train), 0
        else:
            state, meta, start = restored
            log.info("resumed from step %d (data position %d)", start, meta["data_step"])
        # Every process has read the saved config.json before process 0 replaces it.
        parallel.barrier("simclr_config_checked")
        config_base.record_run(recorded, workdir, JOB)
        log.info(
            "pretraining %s with %s on %s: %d steps (%d per epoch), global batch %d on %d devices",
            models.encoder_label(config.model),
            config.method,
            config.dataset,
            total_steps,
            steps_per_epoch,
            config.batch_size,
            mesh.devices.size,
        )
        monitor_every = monitors.cadence(config)
        last_monitors: list[tuple[int, dict[str, float]]] = []

        def keep_monitors(step: int, m: dict[str, float]) -> dict[str, float]:
            # The step computed the monitors exactly on these steps (zeros otherwise).
            if loop.itstime(step, monitor_every, total_steps):
                last_monitors[:] = [(step, {k: m[k] for k in monitors.NAMES})]
                return m
            return {k: v for k, v in m.items() if k not in monitors.NAMES}

        with_index = methods.get(config.method).needs_index
        run = loop.Run(
            name=JOB,
            step_fn=compile_train_step(
                config, model, tx, schedule, mesh, total_steps, num_train_examples=n_train
            ),
            host_batches=lambda: data.pretrain_iterator(
                config, start_step=start, with_index=with_index, tokenizer=tokenizer
            ),
            mesh=mesh,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=config.batch_size,
            log_every=config.log_every_steps,
            also_log_every=monitor_every,
            checkpoint_every=config.checkpoint_every_steps,
            writer=writer,
            manager=manager,
            hint="lower optim.base_lr or check the data",
            on_metrics=keep_monitors,
            show={"loss": "loss", "acc": "contrastive_acc", "lin": "linear_acc", "lr": "lr"},
        )
        out = loop.run(run, state, start)
    finally:
        writer.close()
        loop.close_manager(manager)
    monitors_at = last_monitors[0] if last_monitors else None
    return Pretrained(out.state, model, mesh, out.preempted, monitors_at)


def text_tokenizer(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[ml_collections.ConfigDict, Any]:
    """A text run's config with `data.tokenizer` resolved, and its tokenizer; else (config, None).

    The run's tokenizer is `WORKDIR/tokenizer.json`: on the first start a copy of
    `data.tokenizer` when that names one, else trained on the training split; a resumed run
    loads it and never retrains. Training is deterministic and every write atomic, so every
    process may do it. The returned config names that file in `data.tokenizer` (what a method
    reading token ids, e.g. CLEAR's synonym table, opens).
    """
    if data.modality(config.dataset) != "text":
        return config, None
    path = os.path.join(workdir, data.TOKENIZER_FILE)
    if config.data.tokenizer and not os.path.exists(path):
        # Checked (special ids, at most model.vocab_size tokens) before it is copied.
        given = data.load_tokenizer_for(config.data.tokenizer, int(config.model.vocab_size))
        os.makedirs(workdir, exist_ok=True)
        data.save_tokenizer(given, path)
    tok = data.load_or_train_tokenizer(config, workdir)
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.data.tokenizer = path
    return resolved, tok


def export_run(config: ml_collections.ConfigDict, state: TrainState, workdir: str) -> str:
    """Exports the encoder and projection head of `state` to `workdir/export/`."""
    variables = jax.device_get(
        {
            # CPC trains no projection head: its export has an empty one.
            "params": {"encoder": state.params["encoder"], "head": state.params.get("head", {})},
            # A head without BN (model.head_bn=False) or a ViT encoder has no statistics.
            "batch_stats": {
                "encoder": state.batch_stats.get("encoder", {}),
                "head": state.batch_stats.get("head", {}),
            },
        }
    )
    source = {
        "workdir": os.path.abspath(workdir),
        "step": int(state.step),
        "config": config.to_dict(),
    }
    model = models.describe_encoder(config.model, variables["params"]["encoder"])
    # The method builds the head (SimSiam's last BN has no scale): record what was trained.
    model["head_out_scale"] = models.head_out_scale(config.model, variables["params"]["head"])
    tokenizer = os.path.join(workdir, data.TOKENIZER_FILE)  # a text run's: its exports carry it
    extra = {data.TOKENIZER_FILE: tokenizer} if os.path.exists(tokenizer) else None
    return checkpoint.export_encoder(
        checkpoint.export_dir(workdir), variables, model, source, extra_files=extra
    )


def restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[TrainState, Any]:
    """The latest checkpoint of `workdir` as a replicated state, with its model."""
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    info = data.dataset_info(config)
    steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
    model, tx, _ = model_and_optimizer(config, info.num_classes, steps_per_epoch)
    abstract = abstract_train_state(config, model, tx, mesh, info.num_train_examples)
    manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
    try:
        restored = checkpoint.restore_latest(manager, abstract, workdir)
    finally:
        manager.close()
    if restored is None:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}; pretrain first with "
            f"--mode=pretrain --workdir={workdir}"
        )
    return restored[0], model
