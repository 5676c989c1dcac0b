"""SimCLR pretraining: the train state, the pure sharded train step, and the training loop."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax import (
    augment,
    checkpoint,
    config_base,
    data,
    losses,
    models,
    monitors,
    optim,
    parallel,
)
from simclr_jax.metric_writer import MetricWriter

log = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: a resumed run restores exactly this."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # root PRNG key (raw uint32 data); step keys are fold_in(rng, step)
    # Per-method extra state (a dict), None for SimCLR. MoCo: key encoder + queue (moco.py).
    method_state: Any = None


def init_variables(model: models.SimCLRModel, key: jax.Array, image_size: int) -> dict[str, Any]:
    """Initialises model variables from a dummy batch of the training image size."""
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    return model.init(key, dummy, train=False)


def _state_initializer(
    config: ml_collections.ConfigDict, model: models.SimCLRModel, tx: optax.GradientTransformation
) -> Callable[[], TrainState]:
    """The pure function that builds the initial state from `config.seed`."""
    if config.method == "moco":
        from simclr_jax import moco

        num_keys = moco.queue_size(config)

    def init() -> TrainState:
        # Created inside the traced function: no host-to-device transfer of the seed.
        root = jax.random.key(config.seed)
        variables = init_variables(model, jax.random.fold_in(root, 0), config.augment.image_size)
        method_state = None
        if config.method == "moco":
            method_state = moco.init_moco_state(
                config, variables, jax.random.fold_in(root, 2), num_keys
            )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            rng=jax.random.key_data(jax.random.fold_in(root, 1)),
            method_state=method_state,
        )

    return init


def create_train_state(
    config: ml_collections.ConfigDict,
    model: models.SimCLRModel,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """Builds the initial state directly on the mesh (replicated), from `config.seed`."""
    init = _state_initializer(config, model, tx)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def abstract_train_state(
    config: ml_collections.ConfigDict,
    model: models.SimCLRModel,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, without computing it."""
    shapes = jax.eval_shape(_state_initializer(config, model, tx))
    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def step_key(state: TrainState) -> jax.Array:
    """The step's PRNG key: fold_in(root, step), so a resumed run draws the same stream."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _sharded_nt_xent(
    mesh: Mesh,
    temperature: float,
    decoupled: bool = False,
    impl: str = "dense",
    chunk_size: int = 1024,
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """NT-Xent over the global batch: each device's rows against the gathered batch.

    `impl='blockwise'` visits the gathered batch `chunk_size` columns at a time, so a device
    never holds its full [local, global] logits (huge global batches); same values.
    """
    if impl == "blockwise":
        from simclr_jax import losses_blockwise

        loss_fn = functools.partial(
            losses_blockwise.nt_xent_blockwise_with_metrics, chunk_size=chunk_size
        )
    elif impl == "dense":
        loss_fn = losses.nt_xent_with_metrics
    else:
        raise ValueError(f"config.loss.impl={impl!r} is not one of ['dense', 'blockwise']")
    return jax.shard_map(
        functools.partial(
            loss_fn,
            temperature=temperature,
            axis_name=parallel.DATA_AXIS,
            decoupled=decoupled,
        ),
        mesh=mesh,
        in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=(P(), P()),
    )


def make_views(
    key: jax.Array,
    images: jax.Array,
    config: ml_collections.ConfigDict,
    boxes: jax.Array | None = None,
) -> jax.Array:
    """Two augmented views per image, interleaved `[2B, S, S, 3]` (rows 2i, 2i+1 from image i).

    `boxes` are the batch's host-sampled crop windows (`batch['crop']`, see `augment.views`).
    Interleaving keeps both views of an example on the device that holds the example, so the
    batch never moves between devices before the encoder.
    """
    v = augment.views(key, images, config.augment, num_views=2, boxes=boxes)  # [2, B, S, S, 3]
    v = jnp.swapaxes(v, 0, 1)
    return v.reshape((-1,) + v.shape[2:])


def online_linear_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Online linear head's loss and accuracy: `logits [B, V, C]` for V views, `labels [B]`.

    The head sees stop-gradient features; unlabelled examples (label -1) are skipped.
    """
    labelled = labels >= 0
    safe = jnp.where(labelled, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe[:, None])
    weight = labelled[:, None].astype(jnp.float32) * jnp.ones((1, logits.shape[1]))
    denom = jnp.maximum(jnp.sum(weight), 1.0)
    return {
        "linear_loss": jnp.sum(ce * weight) / denom,
        "linear_acc": jnp.sum((jnp.argmax(logits, -1) == safe[:, None]) * weight) / denom,
    }


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: models.SimCLRModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    total_steps: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SimCLR update: augment on device, encode 2B views with global BN, NT-Xent, LARS.

    Pure in `(state, batch)`; the step's key is derived from the state (see `step_key`).
    `total_steps` (default `config.total_steps`) makes the last step a monitor step too.
    """
    key = step_key(state)
    x = make_views(key, batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    batch_size = labels.shape[0]
    nt_xent = _sharded_nt_xent(
        mesh,
        config.temperature,
        decoupled=config.loss.decoupled,
        impl=config.loss.impl,
        chunk_size=config.loss.chunk_size,
    )

    def loss_fn(params):
        out, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        z = out["projection"].reshape(batch_size, 2, -1)
        loss, metrics = nt_xent(z[:, 0], z[:, 1])
        linear = online_linear_metrics(out["logits"].reshape(batch_size, 2, -1), labels)
        metrics = {**metrics, **linear}
        embeddings = (z[:, 0], z[:, 1], out["features"])
        aux = (loss, metrics, new_vars["batch_stats"], embeddings)
        return loss + linear["linear_loss"], aux

    grads, (loss, metrics, batch_stats, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    total = total_steps or config.total_steps
    due = monitors.is_due(new_state.step, monitors.cadence(config), total)
    metrics = {
        **metrics,
        **monitors.maybe_representation_metrics(due, *embeddings),
        "loss": loss,
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    return new_state, metrics


def compile_train_step(
    config: ml_collections.ConfigDict,
    model: models.SimCLRModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    total_steps: int = 0,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The method's step jitted once over the mesh: state replicated and donated, batch on 'data'.

    `config.method` picks `train_step` (SimCLR) or `moco.moco_train_step`; `total_steps` (the
    run length, default `config.total_steps`) drives the last monitor step and MoCo's cosine
    momentum.
    """
    step_impl = train_step
    if config.method == "moco":
        from simclr_jax import moco

        step_impl = moco.moco_train_step
    step = functools.partial(
        step_impl,
        model=model,
        tx=tx,
        schedule=schedule,
        config=config,
        mesh=mesh,
        total_steps=total_steps,
    )
    return jax.jit(
        step,
        in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
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


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _batches(it: Iterator[dict[str, np.ndarray]], mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
    """Global device batches, one placed ahead so the transfer overlaps the running step."""
    nxt = parallel.host_to_global(next(it), mesh)
    while True:
        cur = nxt
        nxt = parallel.host_to_global(next(it), mesh)
        yield cur


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> dict[str, Any]:
    """Pretrains (resuming from `workdir` when it has checkpoints), exports and evaluates.

    Returns `{'state', 'eval'}`: the final train state and the evaluation results (or None).
    """
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    info = data.dataset_info(config)
    steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
    total_steps = optim.total_train_steps(config, steps_per_epoch)

    model = models.create_model(config, info.num_classes)
    params_shape = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0), config.augment.image_size)
    )["params"]
    tx, schedule = optim.make_optimizer(config, params_shape, steps_per_epoch)
    check_resume_config(config, workdir, allow_config_change)
    manager = checkpoint.create_manager(
        workdir, keep=config.keep_checkpoints, keep_period=config.keep_period
    )
    restored = checkpoint.restore_latest(
        manager, abstract_train_state(config, model, tx, mesh), workdir
    )
    if restored is None:
        state, start_step = create_train_state(config, model, tx, mesh), 0
    else:
        state, meta, start_step = restored
        log.info("resumed from step %d (data position %d)", start_step, meta["data_step"])
    # Every process has read the saved config.json before process 0 replaces it.
    parallel.barrier("simclr_config_checked")
    write_config(config, workdir)

    step_fn = compile_train_step(config, model, tx, schedule, mesh, total_steps=total_steps)
    monitor_every, last_monitors = monitors.cadence(config), None
    host_iter = data.pretrain_iterator(config, start_step=start_step)
    batches = _batches(host_iter, mesh)
    writer = MetricWriter(workdir)
    is_main = jax.process_index() == 0
    log.info(
        "pretraining %s on %s: %d steps (%d per epoch), global batch %d on %d devices",
        f"ResNet-{config.model.depth}",
        config.dataset,
        total_steps,
        steps_per_epoch,
        config.batch_size,
        mesh.devices.size,
    )

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps, initial=start_step, disable=not is_main, unit="step", dynamic_ncols=True
    )
    t_last, step_last = time.perf_counter(), start_step
    step = start_step
    try:
        with _Preemption() as preemption:
            while step < total_steps:
                state, metrics = step_fn(state, next(batches))
                step += 1
                bar.update(1)
                # The step computed the monitors exactly on these steps (zeros otherwise).
                monitor_now = itstime(step, monitor_every, total_steps)
                if monitor_now or itstime(step, config.log_every_steps, total_steps):
                    m = _host_metrics(metrics)
                    if monitor_now:
                        last_monitors = (step, {k: m[k] for k in monitors.NAMES})
                    else:
                        for name in monitors.NAMES:
                            del m[name]
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(
                            f"loss is {m['loss']} at step {step} (first non-finite value in steps "
                            f"{step_last + 1}..{step}); lower optim.base_lr or check the data"
                        )
                    now = time.perf_counter()
                    m["images_per_sec"] = (step - step_last) * config.batch_size / (now - t_last)
                    m["epoch"] = step / steps_per_epoch
                    t_last, step_last = now, step
                    writer.write(step, m)
                    bar.set_postfix(
                        loss=f"{m['loss']:.3f}",
                        acc=f"{m['contrastive_acc']:.2f}",
                        lin=f"{m['linear_acc']:.2f}",
                        lr=f"{m['lr']:.3g}",
                    )
                preempted = preemption.requested or manager.reached_preemption(step)
                if preempted or itstime(step, config.checkpoint_every_steps, total_steps):
                    checkpoint.save(manager, step, state, {"step": step, "data_step": step})
                if preempted:
                    manager.wait_until_finished()
                    log.warning(
                        "stopped at step %d after a preemption notice; rerun to resume", step
                    )
                    return {"state": state, "eval": None, "preempted": True}
        if manager.latest_step() != total_steps:
            checkpoint.save(manager, total_steps, state, {"step": step, "data_step": step})
        manager.wait_until_finished()
    finally:
        bar.close()
        writer.close()
        manager.close()

    if is_main and last_monitors is not None:
        print(monitors.format_monitors(*last_monitors), flush=True)
    export_run(config, state, workdir)
    results = None
    if config.eval.at_end:
        from simclr_jax import evaluate

        results = evaluate.evaluate_run(config, model, state, mesh, workdir)
    if jax.process_index() == 0:
        from simclr_jax import report

        print(f"run report: {report.write_report(workdir)}", flush=True)
    return {"state": state, "eval": results, "preempted": False}


def export_run(config: ml_collections.ConfigDict, state: TrainState, workdir: str) -> str:
    """Exports the encoder and projection head of `state` to `workdir/export/`."""
    variables = jax.device_get(
        {
            "params": {"encoder": state.params["encoder"], "head": state.params["head"]},
            # A head without BN (model.head_bn=False) has no statistics.
            "batch_stats": {
                "encoder": state.batch_stats["encoder"],
                "head": state.batch_stats.get("head", {}),
            },
        }
    )
    source = {
        "workdir": os.path.abspath(workdir),
        "step": int(state.step),
        "config": config.to_dict(),
    }
    return checkpoint.export_encoder(
        checkpoint.export_dir(workdir), variables, config.model.to_dict(), source
    )


def restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[TrainState, models.SimCLRModel]:
    """The latest checkpoint of `workdir` as a replicated state, with its model."""
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    info = data.dataset_info(config)
    steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
    model = models.create_model(config, info.num_classes)
    shapes = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0), config.augment.image_size)
    )
    tx, _ = optim.make_optimizer(config, shapes["params"], steps_per_epoch)
    abstract = abstract_train_state(config, model, tx, mesh)
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
