"""Pretraining: the loop that runs any registered method's pure sharded step.

The loop knows no method by name: `config.method` picks a `methods.Method`, which gives the
model, the extra state and the step (see `simclr_jax/methods/base.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import checkpoint, config_base, data, methods, monitors, optim
from simclr_jax.methods.state import TrainState
from simclr_jax.models import init_variables
from simclr_jax.runtime import cpu_conv, loop, parallel
from simclr_jax.runtime.compile import jit_init
from simclr_jax.runtime.metric_writer import MetricWriter

log = logging.getLogger(__name__)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The network `config.method` trains (encoder + projection head + its extras)."""
    return methods.get(config.method).build_model(config, num_classes, conv=cpu_conv.for_backend())


def model_and_optimizer(
    config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int
) -> tuple[Any, optax.GradientTransformation, optax.Schedule]:
    """The run's network, its optimizer and LR schedule (built on the params' shapes only)."""
    model = create_model(config, num_classes)
    shapes = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0), config.augment.image_size)
    )
    tx, schedule = optim.make_optimizer(config, shapes["params"], steps_per_epoch)
    return model, tx, schedule


def _state_initializer(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    num_train_examples: int | None = None,
) -> Callable[[], TrainState]:
    """The pure function that builds the initial state from `config.seed`."""
    method = methods.get(config.method)
    if num_train_examples is None:
        num_train_examples = data.dataset_info(config).num_train_examples

    def init() -> TrainState:
        # Created inside the traced function: no host-to-device transfer of the seed.
        root = jax.random.key(config.seed)
        variables = init_variables(model, jax.random.fold_in(root, 0), config.augment.image_size)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            rng=jax.random.key_data(jax.random.fold_in(root, 1)),
            method_state=method.init_state(
                config, variables, jax.random.fold_in(root, 2), num_train_examples
            ),
        )

    return init


def state_shardings(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    num_train_examples: int | None = None,
    shapes: TrainState | None = None,
) -> Any:
    """The state's shardings: a TrainState of NamedShardings (or one replicated sharding).

    Everything is replicated except `method_state` when the method shards it
    (`Method.state_sharding`, e.g. InstDisc's memory bank by rows over 'data'). `shapes`, the
    state's `eval_shape` when the caller has it, saves tracing the initialiser again.
    """
    rep = parallel.replicated(mesh)
    method = methods.get(config.method)
    if method.state_sharding is None:
        return rep
    if shapes is None:
        shapes = jax.eval_shape(_state_initializer(config, model, tx, num_train_examples))
    shardings = jax.tree.map(lambda _: rep, shapes)
    if shapes.method_state is None:
        return shardings
    return shardings.replace(method_state=method.state_sharding(mesh, shapes.method_state))


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    num_train_examples: int | None = None,
) -> TrainState:
    """Builds the initial state directly on the mesh (`state_shardings`), from `config.seed`."""
    init = _state_initializer(config, model, tx, num_train_examples)
    shardings = state_shardings(config, model, tx, mesh, num_train_examples)
    return jit_init(init, out_shardings=shardings)()


def abstract_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    num_train_examples: int | None = None,
) -> TrainState:
    """Shapes, dtypes and shardings (`state_shardings`) of the state, without computing it."""
    shapes = jax.eval_shape(_state_initializer(config, model, tx, num_train_examples))
    shardings = state_shardings(config, model, tx, mesh, num_train_examples, shapes)
    if not isinstance(shardings, TrainState):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def compile_train_step(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The method's step jitted once over the mesh: state donated, batch on 'data'.

    `config.method` picks the registered step; `total_steps` (the run length, default
    `config.total_steps`) drives the last monitor step and run-length-dependent schedules.
    The state keeps its `state_shardings` (replicated, except a method's sharded state, sized
    for `num_train_examples`, default the dataset's).
    """
    step = functools.partial(
        methods.get(config.method).train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        config=config,
        mesh=mesh,
        total_steps=total_steps,
    )
    shardings = state_shardings(config, model, tx, mesh, num_train_examples)
    return jax.jit(
        step,
        in_shardings=(shardings, parallel.data_sharded(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


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
    n_train = info.num_train_examples
    for line in methods.get(config.method).resolve(config, total_steps, n_train):
        if line.startswith("WARNING: "):
            log.warning(line.removeprefix("WARNING: "))
        else:
            log.info(line)

    model, tx, schedule = model_and_optimizer(config, info.num_classes, steps_per_epoch)
    loop.check_resume_config(config, workdir, allow_config_change)
    manager = checkpoint.create_manager(
        workdir, keep=config.keep_checkpoints, keep_period=config.keep_period
    )
    restored = checkpoint.restore_latest(
        manager, abstract_train_state(config, model, tx, mesh, n_train), workdir
    )
    if restored is None:
        state, start_step = create_train_state(config, model, tx, mesh, n_train), 0
    else:
        state, meta, start_step = restored
        log.info("resumed from step %d (data position %d)", start_step, meta["data_step"])
    # Every process has read the saved config.json before process 0 replaces it.
    parallel.barrier("simclr_config_checked")
    loop.write_config(config, workdir)

    step_fn = compile_train_step(
        config, model, tx, schedule, mesh, total_steps=total_steps, num_train_examples=n_train
    )
    monitor_every, last_monitors = monitors.cadence(config), None
    host_iter = data.pretrain_iterator(
        config, start_step=start_step, with_index=methods.get(config.method).needs_index
    )
    batches = loop.device_batches(host_iter, mesh)
    writer = MetricWriter(workdir)
    is_main = jax.process_index() == 0
    log.info(
        "pretraining %s with %s on %s: %d steps (%d per epoch), global batch %d on %d devices",
        f"ResNet-{config.model.depth}",
        config.method,
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
        with loop.Preemption() as preemption:
            while step < total_steps:
                state, metrics = step_fn(state, next(batches))
                step += 1
                bar.update(1)
                # The step computed the monitors exactly on these steps (zeros otherwise).
                monitor_now = loop.itstime(step, monitor_every, total_steps)
                if monitor_now or loop.itstime(step, config.log_every_steps, total_steps):
                    m = loop.host_metrics(metrics)
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
                    shown = {"loss": "loss", "acc": "contrastive_acc", "lin": "linear_acc"}
                    postfix = {k: f"{m[v]:.3f}" for k, v in shown.items() if v in m}
                    bar.set_postfix(**postfix, lr=f"{m['lr']:.3g}")
                preempted = preemption.requested or manager.reached_preemption(step)
                if preempted or loop.itstime(step, config.checkpoint_every_steps, total_steps):
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
        from simclr_jax.evals import end_of_run as evaluate

        results = evaluate.evaluate_run(config, model, state, mesh, workdir)
    if jax.process_index() == 0:
        from simclr_jax.outputs import report

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
    model = config.model.to_dict()
    # The method builds the head (SimSiam's last BN has no scale): record what was trained.
    last_bn = variables["params"]["head"].get(f"bn{config.model.head_layers}", {})
    model["head_out_scale"] = not config.model.head_bn or "scale" in last_bn
    return checkpoint.export_encoder(checkpoint.export_dir(workdir), variables, model, source)


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
