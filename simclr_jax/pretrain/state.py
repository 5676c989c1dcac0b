"""The pretraining state of a registered method: its network, optimizer, state and jitted step.

Nothing here knows a method by name: `config.method` picks a `methods.Method`, which gives the
model, the extra state and the step (see `simclr_jax/methods/base.py`). The state is built
directly on the mesh, replicated except what a method shards (`Method.state_sharding`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from simclr_jax import data, methods, optim
from simclr_jax.methods.state import TrainState
from simclr_jax.models import init_variables
from simclr_jax.runtime import cpu_conv, keys, loop, parallel
from simclr_jax.runtime.compiled import jit_init


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The network `config.method` trains (encoder + projection head + its extras)."""
    return methods.get(config.method).build_model(config, num_classes, conv=cpu_conv.for_backend())


def model_and_optimizer(
    config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int
) -> tuple[Any, optax.GradientTransformation, optax.Schedule]:
    """The run's network, its optimizer and LR schedule (built on the params' shapes only)."""
    model = create_model(config, num_classes)
    shapes = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0), config.augment.image_size, config.model)
    )
    frozen = methods.get(config.method).frozen_params(config)
    tx, schedule = optim.make_optimizer(config, shapes["params"], steps_per_epoch, frozen)
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
        seed = config.seed
        params_key = keys.derive(seed, keys.INIT_PARAMS)
        variables = init_variables(model, params_key, config.augment.image_size, config.model)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            rng=jax.random.key_data(keys.derive(seed, keys.STEP_STREAM)),
            method_state=method.init_state(
                config, variables, keys.derive(seed, keys.METHOD_STATE), num_train_examples
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

    Its metrics carry the loop's health metrics (`loop.with_update_norm`).

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
        num_train_examples=num_train_examples or data.dataset_info(config).num_train_examples,
    )
    shardings = state_shardings(config, model, tx, mesh, num_train_examples)
    return jax.jit(
        loop.with_update_norm(step),
        in_shardings=(shardings, parallel.data_sharded(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
