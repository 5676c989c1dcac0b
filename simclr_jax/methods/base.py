"""The method interface: what an objective gives the loop, and the registry that names them.

A method is one module in `simclr_jax/methods/` that builds a `Method` and passes it to
`register`. The loop, checkpoints, export and evaluation see only this interface:

- `config_defaults()`: the method's own config section `config.<name>` (None: no section);
- `validate(config)`: raises `ConfigError` for a bad value of its keys;
- `build_model(config, num_classes, conv)`: the trained network (default: encoder + projection head
  + online linear head; BYOL and SimSiam add a predictor);
- `init_state(config, variables, key, num_train_examples)`: its extra state (EMA target,
  queue, bank) as a pytree, or None; it lives in `TrainState.method_state`, so it is
  donated, checkpointed and restored with the rest (replicated unless `state_sharding`
  shards it, e.g. InstDisc's memory bank by rows);
- `train_step(state, batch, *, model, tx, schedule, config, mesh, total_steps,
  num_train_examples)`: the pure update on the views the shared step makes
  (`methods.state.make_views`); the job passes the run's length and the training split's size
  (a method never reads dataset metadata itself);
- `resolve(config, total_steps, num_train_examples)`: run-length-dependent settings, returning
  warnings for the user (e.g. an EMA time constant longer than the run).
- `state_sharding(mesh, method_state)`: NamedShardings for the extra state (None: replicated);
- `needs_index`: the batches carry `'index'`, each example's position in the training split;
- `frozen_params(config)`: key paths of param subtrees the optimizer never changes (MoCo v3's
  frozen patch projection, `('encoder', 'embedding')`); none by default.
- `modality`: what its batches carry, `'image'` (`'image'`, `'label'`) or `'text'` (`'tokens'`,
  `'words'`, `'label'`: CLEAR).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simclr_jax import models, monitors
from simclr_jax.config.checks import ConfigError
from simclr_jax.methods.state import TrainState

StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def no_extra_state(config: Any, variables: Any, key: jax.Array, num_train_examples: int) -> None:
    """For methods whose state is the train state alone."""
    return None


def no_validation(config: Any) -> None:
    """For methods without keys of their own."""


def nothing_to_resolve(config: Any, total_steps: int, num_train_examples: int) -> list[str]:
    """For methods without run-length-dependent settings."""
    return []


def nothing_frozen(config: Any) -> tuple[tuple[str, ...], ...]:
    """For methods that train every parameter."""
    return ()


@dataclasses.dataclass(frozen=True)
class Method:
    """One objective: its config section, validation, model, extra state and step."""

    name: str
    train_step: StepFn
    summary: str  # one line for docs and error messages
    config_defaults: Callable[[], ml_collections.ConfigDict] | None = None
    validate: Callable[[Any], None] = no_validation
    # (config, num_classes, conv): `conv` is the backend's conv primitive (models.create_encoder).
    build_model: Callable[..., Any] = models.create_model
    init_state: Callable[[Any, Any, jax.Array, int], Any] = no_extra_state
    resolve: Callable[[Any, int, int], list[str]] = nothing_to_resolve
    # Shardings of `method_state` (a pytree of NamedShardings for `state_sharding(mesh,
    # abstract method_state)`); None: replicated, like the rest of the state.
    state_sharding: Callable[[Any, Any], Any] | None = None
    # True: pretraining batches carry 'index' int32 [b], each example's position in the
    # training split (the same on every host and after a resume), e.g. for a memory bank.
    needs_index: bool = False
    # Key paths into the params of subtrees with a zero update (`optim.freeze`): bit-identical.
    frozen_params: Callable[[Any], tuple[tuple[str, ...], ...]] = nothing_frozen
    # What the batches carry: 'image' (images, every method so far) or 'text' (token ids).
    modality: str = "image"


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds `method` to the registry under its name (once)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> Method:
    """The registered method `name`; a `ConfigError` listing the registered ones otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"config.method={name!r} is invalid: one of {names()}")
    return REGISTRY[name]


def train_apply(
    model: Any, params: Any, batch_stats: Any, x: jax.Array, **kwargs: Any
) -> tuple[dict, Any]:
    """The network in train mode (BN over the global batch): its outputs and new BN statistics.

    `kwargs` go to the model's `__call__` (CLEAR's `mlm_every`).
    """
    out, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        **kwargs,
    )
    return out, new_vars.get("batch_stats", {})  # none: a ViT with a BN-free head


def apply_gradients(
    state: TrainState, grads: Any, tx: optax.GradientTransformation, **replace: Any
) -> TrainState:
    """The optimizer update of `state.params`, the step count + 1 and any other field replaced."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **replace)


def step_metrics(
    old_step: jax.Array,
    new_state: TrainState,
    grads: Any,
    loss: jax.Array,
    metrics: dict[str, jax.Array],
    embeddings: tuple[jax.Array, jax.Array, jax.Array],
    *,
    schedule: optax.Schedule,
    config: Any,
    total_steps: int,
) -> dict[str, jax.Array]:
    """The metrics every step reports: the method's, monitors when due, loss, LR and norms.

    `embeddings` are (view-1 projections, view-2 projections, encoder features) for the
    align / uniform / rankme monitors, computed only on monitor steps.
    """
    due = monitors.is_due(new_state.step, monitors.cadence(config), total_steps)
    return {
        **metrics,
        **monitors.maybe_representation_metrics(due, *embeddings),
        "loss": loss,
        "lr": schedule(old_step),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_state.params),
    }


def gradient_update(
    state: TrainState,
    loss_fn: Callable[[Any], tuple[jax.Array, tuple[Any, ...]]],
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule,
    config: Any,
    total_steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The step of a method whose only state is the train state: grad, update, metrics.

    `loss_fn(params)` returns `(total loss, (loss, metrics, new batch_stats, embeddings))`,
    `embeddings` as `step_metrics` takes them; `total_steps` 0 reads `config.total_steps`.
    """
    grads, (loss, metrics, batch_stats, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, tx, batch_stats=batch_stats)
    return new_state, step_metrics(
        state.step,
        new_state,
        grads,
        loss,
        metrics,
        embeddings,
        schedule=schedule,
        config=config,
        total_steps=total_steps or int(config.total_steps),
    )


def ema(target: Any, online: Any, momentum: jax.Array) -> Any:
    """`momentum * target + (1 - momentum) * online`, leaf by leaf."""
    return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def cosine_momentum(
    base: float, cosine: bool, step: jax.Array, total_steps: int, key: str
) -> jax.Array:
    """EMA rate at `step`: `base`, or BYOL's `1 - (1 - base)(cos(pi k / K) + 1) / 2` to 1.

    `key` names the config key that asked for the cosine schedule, for the error message.
    """
    if not cosine:
        return jnp.asarray(base, jnp.float32)
    if total_steps <= 0:
        raise ValueError(
            f"config.{key} needs the run length: set config.total_steps, or pass "
            "total_steps to train.compile_train_step"
        )
    frac = jnp.minimum(step.astype(jnp.float32) / total_steps, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def auto_momentum(total_steps: int, low: float, high: float) -> float:
    """An EMA rate whose time constant 1/(1-m) is a quarter of the run, clipped to [low, high]."""
    return float(min(max(1.0 - 4.0 / max(total_steps, 1), low), high))


def ema_time_constant_warning(
    key: str, momentum: float, total_steps: int, suggestion: float
) -> list[str]:
    """A warning when an EMA's time constant 1/(1-m) exceeds a quarter of the run, else none."""
    tau = 1.0 / max(1.0 - momentum, 1e-12)
    if tau <= total_steps / 4:
        return []
    return [
        f"WARNING: config.{key}={momentum} averages over ~{tau:.0f} steps but the run has "
        f"{total_steps}: the target network would stay near its random init; set "
        f"--config.{key}={suggestion:g} (or -1 to derive it from the run length)"
    ]
