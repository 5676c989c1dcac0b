"""A classifier trained on a streamed labelled split in the run loop: linear eval and fine-tuning.

`run_classifier` builds the classifier's state, jitted step and checkpoint manager and hands them
to `runtime.loop.run`, the loop pretraining uses too (cadence, health checks, checkpoints with the
data position, preemption, resume bit-identical to an uninterrupted run). The model, step and
evaluation are `evals.classifier`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import checkpoint, config_base
from simclr_jax.data import labelled
from simclr_jax.evals.classifier import (
    Classifier,
    ClassifierState,
    classifier_train_step,
    evaluate_classifier,
    global_batch,
    make_optimizer,
    train_augment_config,
)
from simclr_jax.runtime import compiled, loop, parallel
from simclr_jax.runtime.metric_writer import MetricWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ClassifierRun:
    """What `run_classifier` trains: model, starting variables, data selection and schedule."""

    job: str  # 'linear_eval' | 'finetune' (names the run dir's job and the metrics)
    model: Classifier
    variables: dict[str, Any]  # all classifier variables (from `initial_variables`)
    section: ml_collections.ConfigDict  # epochs, batch_size, optimizer, base_lr, ... keys
    keep: np.ndarray | None = None  # train indices used (label fraction), None: all
    subset: str = ""  # official subset name (tfds builder)
    eval_every_epochs: float = 0.0
    max_examples: int = 0  # cap on train and test examples (bounded end-of-run evaluation)


def _split_variables(run: ClassifierRun) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(trainable params, frozen {params, batch_stats}, trainable batch stats) of `run`."""
    freeze = run.model.freeze
    params = run.variables["params"]
    trainable = {k: v for k, v in params.items() if k == "classifier" or not freeze}
    frozen = {
        "params": {k: v for k, v in params.items() if k not in trainable},
        "batch_stats": {} if not freeze else run.variables["batch_stats"],
    }
    return trainable, frozen, ({} if freeze else run.variables["batch_stats"])


def jit_step(step: Callable[..., Any], mesh: Mesh, frozen_shardings: Any = None) -> Any:
    """`step(state, frozen, batch)` jitted over `mesh`: state donated, state and frozen
    variables replicated, the batch split on 'data' (one compile per process for equal inputs).
    `frozen_shardings`: the frozen variables' shardings instead (e.g. a sharded teacher's).
    """
    rep = parallel.replicated(mesh)
    frozen = rep if frozen_shardings is None else frozen_shardings
    return compiled.cached(
        lambda: jax.jit(
            loop.with_update_norm(step),
            in_shardings=(rep, frozen, parallel.data_sharded(mesh)),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        )
    )


def _jitted_step(
    run: ClassifierRun, config: ml_collections.ConfigDict, tx: Any, schedule: Any, mesh: Mesh
) -> Any:
    """The classifier's step jitted over `mesh` (shared by runs with the same inputs)."""
    aug_cfg = train_augment_config(config, bool(run.section.augment))
    step = functools.partial(
        classifier_train_step,
        model=run.model,
        tx=tx,
        schedule=schedule,
        aug_cfg=aug_cfg,
        seed=config.seed,
    )
    return jit_step(step, mesh)


def open_run(
    config: ml_collections.ConfigDict,
    run_dir: str | None,
    job: str,
    allow_change: bool,
    init: Callable[[], Any],
    mesh: Mesh,
    total: int,
) -> tuple[Any, int, Any]:
    """`(state, start step, checkpoint manager)` of a downstream run: resumed, or `init()`.

    With a `run_dir`: the resume check for `job`, `job.json` + `config.json` recorded, the latest
    checkpoint restored (replicated) if there is one; without: `init()` and no manager.
    """
    rep = parallel.replicated(mesh)
    manager, start, state = None, 0, None
    if run_dir is not None:
        config_base.check_resume(config, run_dir, job, allow_change)
        # Every process has checked the run dir (and read its config.json) before process 0
        # records this job there and the manager creates checkpoints/.
        parallel.barrier(f"simclr_{job}_run_dir_checked")
        config_base.record_run(config, run_dir, job)
        manager = checkpoint.create_manager(run_dir, keep=config.keep_checkpoints)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), jax.eval_shape(init)
        )
        restored = checkpoint.restore_latest(manager, abstract, run_dir)
        if restored is not None:
            state, _, start = restored
            log.info("%s: resumed from step %d of %d", job, start, total)
    if start == 0:
        state = jax.device_put(init(), rep)
    return state, start, manager


def run_classifier(
    config: ml_collections.ConfigDict,
    run: ClassifierRun,
    mesh: Mesh,
    run_dir: str | None,
    *,
    allow_change: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Trains `run.model`'s trainable part on the streamed train split; evaluates on the test split.

    With a `run_dir`: orbax checkpoints, automatic resume (bit-identical to an uninterrupted
    run), `metrics.jsonl` + TensorBoard and `config.json` there. Returns `{'top1', 'top5',
    'num_labels', 'steps', 'epochs', 'history', 'variables', 'preempted'}`.
    """
    sec = run.section
    labelled.labelled_size(config, "test")  # refuses a dataset without labels before writing
    num_labels = labelled.labelled_size(
        config, "train", keep=run.keep, subset=run.subset, max_examples=run.max_examples
    )
    keep = run.keep
    if run.max_examples and keep is None and not run.subset:
        keep = np.arange(num_labels)
    batch = global_batch(sec.batch_size, mesh, num_labels)
    if batch > num_labels:
        raise ValueError(f"{num_labels} labelled examples are fewer than the {batch} devices.")
    spe = max(num_labels // batch, 1)
    total = max(int(round(sec.epochs * spe)), 1)
    trainable, frozen, stats = _split_variables(run)
    tx, schedule = make_optimizer(sec, trainable, batch, total, spe, config.optim.trust_coefficient)
    rep = parallel.replicated(mesh)

    def init() -> ClassifierState:
        return ClassifierState(jnp.zeros((), jnp.int32), trainable, stats, tx.init(trainable))

    state, start, manager = open_run(config, run_dir, run.job, allow_change, init, mesh, total)
    frozen = jax.device_put(frozen, rep)
    jitted = _jitted_step(run, config, tx, schedule, mesh)

    def variables_of(s: ClassifierState) -> dict[str, Any]:
        return {
            "params": {**frozen["params"], **s.params},
            "batch_stats": {**frozen["batch_stats"], **s.batch_stats},
        }

    def evaluate(s: ClassifierState) -> dict[str, float]:
        return evaluate_classifier(
            config, run.model, variables_of(s), mesh, max_examples=run.max_examples
        )

    writer = MetricWriter(run_dir, enabled=None) if run_dir else MetricWriter("", enabled=False)
    history: list[dict[str, float]] = []

    def periodic_eval(step: int, s: ClassifierState) -> None:
        ev = evaluate(s)
        history.append({"step": step, "epoch": step / spe, **ev})
        writer.write(step, {"eval_top1": ev["top1"], "eval_top5": ev["top5"]})

    log.info(
        "%s: %d labelled examples, %d steps (%d per epoch), global batch %d on %d devices",
        run.job,
        num_labels,
        total,
        spe,
        batch,
        mesh.devices.size,
    )
    eval_every = int(round(run.eval_every_epochs * spe)) if run.eval_every_epochs else 0
    spec = loop.Run(
        name=run.job,
        step_fn=lambda s, b: jitted(s, frozen, b),
        host_batches=lambda: labelled.labelled_train_iterator(
            config,
            batch,
            keep=keep,
            subset=run.subset,
            augment=bool(sec.augment),
            seed=config.seed,
            start_step=start,
        ),
        mesh=mesh,
        total_steps=total,
        steps_per_epoch=spe,
        batch_size=batch,
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps,
        writer=writer,
        manager=manager,
        hint=f"lower {run.job}.base_lr",
        hooks=[(eval_every, periodic_eval)],
        show={"loss": "loss", "acc": "train_top1"},
        progress=show_progress,
    )
    try:
        out = loop.run(spec, state, start)
    finally:
        loop.close_manager(manager)
    result: dict[str, Any] = {
        "num_labels": int(num_labels),
        "steps": int(total),
        "epochs": float(sec.epochs),
        "batch_size": int(batch),
        "preempted": out.preempted,
    }
    if not out.preempted:
        ev = evaluate(out.state)
        history.append({"step": total, "epoch": total / spe, **ev})
        writer.write(total, {"eval_top1": ev["top1"], "eval_top5": ev["top5"]})
        result.update(top1=ev["top1"], top5=ev["top5"], num_test_examples=ev["num_examples"])
    writer.close()
    result["history"] = history
    result["variables"] = variables_of(out.state)
    return result
