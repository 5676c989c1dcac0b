"""The downstream training loop: a classifier on a streamed labelled split, resumable.

`run_classifier` is pretraining's loop for a supervised head: `data` streams the train split per
host (resumable by step), `parallel` shards the batches, `checkpoint` saves and restores (the
data position is the step, so a resumed run ends bit-identical to an uninterrupted one),
`MetricWriter` logs, `loop` gives preemption, cadence and the saved config; the model, step and
evaluation are `downstream`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import checkpoint, config_base
from simclr_jax.data import labelled as labelled_data
from simclr_jax.evals.classifier import (
    Classifier,
    ClassifierState,
    classifier_train_step,
    evaluate_classifier,
    global_batch,
    make_optimizer,
    train_augment_config,
)
from simclr_jax.runtime import loop, parallel
from simclr_jax.runtime.metric_writer import MetricWriter

log = logging.getLogger(__name__)

# Keys a resumed downstream run may change: cadence, resources, paths (not what it computes).
RESUME_SAFE_KEYS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "keep_period",
    "monitor_every_steps",
    "finetune.eval_every_epochs",
    "eval.batch_size",
    "data.prefetch",
    "data.num_threads",
    "data.data_dir",
    "data.manual_dir",
    "distributed.",
)


def check_run_dir(
    config: ml_collections.ConfigDict, run_dir: str, job: str, allow_change: bool
) -> None:
    """Refuses a run dir of another job, or one whose saved config differs (RESUME_SAFE_KEYS)."""
    marker = os.path.join(run_dir, "job.json")
    has_checkpoints = os.path.isdir(checkpoint.checkpoint_dir(run_dir))
    saved_job = None
    if os.path.exists(marker):
        with open(marker) as f:
            saved_job = json.load(f).get("job")
    other = saved_job or ("pretraining" if has_checkpoints else None)
    if other not in (None, job):
        raise ValueError(
            f"{run_dir} holds a {other} run; --mode={job} needs its own --workdir (nothing there "
            "was changed)."
        )
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = config_base.flatten(json.load(f))
    new = config_base.flatten(json.loads(config.to_json_best_effort()))
    diffs = [
        f"{k}: {saved.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
        for k in sorted(set(saved) | set(new))
        if not k.startswith(RESUME_SAFE_KEYS) and saved.get(k) != new.get(k)
    ]
    if diffs and not allow_change:
        lines = "\n  ".join(diffs)
        raise ValueError(
            f"{run_dir} holds a {job} run with a different config; resuming would change it:\n"
            f"  {lines}\nUse another --workdir, or pass --allow_config_change to resume anyway."
        )


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
    labelled_data.labelled_size(config, "test")  # refuses a dataset without labels before writing
    num_labels = labelled_data.labelled_size(
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
    freeze = run.model.freeze
    trainable = {
        k: v for k, v in run.variables["params"].items() if k == "classifier" or not freeze
    }
    frozen = {
        "params": {k: v for k, v in run.variables["params"].items() if k not in trainable},
        "batch_stats": {} if not freeze else run.variables["batch_stats"],
    }
    stats = {} if freeze else run.variables["batch_stats"]
    tx, schedule = make_optimizer(sec, trainable, batch, total, spe, config.optim.trust_coefficient)
    rep = parallel.replicated(mesh)

    def init() -> ClassifierState:
        return ClassifierState(jnp.zeros((), jnp.int32), trainable, stats, tx.init(trainable))

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), jax.eval_shape(init)
    )
    manager, start = None, 0
    if run_dir is not None:
        check_run_dir(config, run_dir, run.job, allow_change)
        # Every process has checked the run dir (and read its config.json) before process 0
        # marks it as this job's and the manager creates checkpoints/.
        parallel.barrier(f"simclr_{run.job}_run_dir_checked")
        if jax.process_index() == 0:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "job.json"), "w") as f:
                json.dump({"job": run.job}, f)
        loop.write_config(config, run_dir)
        manager = checkpoint.create_manager(run_dir, keep=config.keep_checkpoints)
        restored = checkpoint.restore_latest(manager, abstract, run_dir)
        if restored is not None:
            state, _, start = restored
            log.info("%s: resumed from step %d of %d", run.job, start, total)
    if start == 0:
        state = jax.device_put(init(), rep)
    frozen = jax.device_put(frozen, rep)
    aug_cfg = train_augment_config(config, bool(sec.get("augment", True)))
    key = (
        "train_step",
        repr(run.model),
        sec.to_json(sort_keys=True),
        aug_cfg.to_json(sort_keys=True),
        config.seed,
        batch,
        total,
        spe,
        config.optim.trust_coefficient,
        tuple(sorted(frozen["params"])),
        mesh,
    )
    step_fn = loop.cached(
        key,
        lambda: jax.jit(
            functools.partial(
                classifier_train_step,
                model=run.model,
                tx=tx,
                schedule=schedule,
                aug_cfg=aug_cfg,
                seed=config.seed,
            ),
            in_shardings=(rep, rep, parallel.data_sharded(mesh)),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        ),
    )

    def variables_of(s: ClassifierState) -> dict[str, Any]:
        return {
            "params": {**frozen["params"], **s.params},
            "batch_stats": {**frozen["batch_stats"], **s.batch_stats},
        }

    def evaluate(s: ClassifierState) -> dict[str, float]:
        return evaluate_classifier(
            config, run.model, variables_of(s), mesh, max_examples=run.max_examples
        )

    eval_every = int(round(run.eval_every_epochs * spe)) if run.eval_every_epochs else 0
    writer = MetricWriter(run_dir, enabled=None) if run_dir else MetricWriter("", enabled=False)
    history: list[dict[str, float]] = []
    is_main = jax.process_index() == 0
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=start,
        disable=not (is_main and show_progress),
        unit="step",
        dynamic_ncols=True,
        desc=run.job,
    )
    log.info(
        "%s: %d labelled examples, %d steps (%d per epoch), global batch %d on %d devices",
        run.job,
        num_labels,
        total,
        spe,
        batch,
        mesh.devices.size,
    )
    step, preempted = start, False
    host_iter = None
    try:
        if step < total:
            host_iter = labelled_data.labelled_train_iterator(
                config,
                batch,
                keep=keep,
                subset=run.subset,
                augment=bool(sec.get("augment", True)),
                seed=config.seed,
                start_step=start,
            )
            batches = loop.device_batches(host_iter, mesh)
        t_last, step_last = time.perf_counter(), step
        with loop.Preemption() as preemption:
            while step < total:
                state, metrics = step_fn(state, frozen, next(batches))
                step += 1
                bar.update(1)
                if loop.itstime(step, config.log_every_steps, total):
                    m = loop.host_metrics(metrics)
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(
                            f"{run.job} loss is {m['loss']} at step {step} (steps "
                            f"{step_last + 1}..{step}); lower {run.job}.base_lr"
                        )
                    now = time.perf_counter()
                    m["images_per_sec"] = (step - step_last) * batch / (now - t_last)
                    m["epoch"] = step / spe
                    t_last, step_last = now, step
                    writer.write(step, m)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['train_top1']:.2f}")
                if eval_every and step < total and step % eval_every == 0:
                    ev = evaluate(state)
                    history.append({"step": step, "epoch": step / spe, **ev})
                    writer.write(step, {"eval_top1": ev["top1"], "eval_top5": ev["top5"]})
                preempted = preemption.requested or (
                    manager is not None and manager.reached_preemption(step)
                )
                if manager is not None and (
                    preempted or loop.itstime(step, config.checkpoint_every_steps, total)
                ):
                    checkpoint.save(manager, step, state, {"step": step, "data_step": step})
                if preempted:
                    log.warning(
                        "%s stopped at step %d (preemption); rerun to resume", run.job, step
                    )
                    break
        if manager is not None:
            if not preempted and manager.latest_step() != total:
                checkpoint.save(manager, total, state, {"step": step, "data_step": step})
            manager.wait_until_finished()
    finally:
        bar.close()
        if host_iter is not None and hasattr(host_iter, "close"):
            host_iter.close()
        if manager is not None:
            manager.close()
    result: dict[str, Any] = {
        "num_labels": int(num_labels),
        "steps": int(total),
        "epochs": float(sec.epochs),
        "batch_size": int(batch),
        "preempted": preempted,
    }
    if not preempted:
        ev = evaluate(state)
        history.append({"step": total, "epoch": total / spe, **ev})
        writer.write(total, {"eval_top1": ev["top1"], "eval_top5": ev["top5"]})
        result.update(top1=ev["top1"], top5=ev["top5"], num_test_examples=ev["num_examples"])
    writer.close()
    result["history"] = history
    result["variables"] = variables_of(state)
    return result
