"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projections.

Online: encoder + projector + predictor (`state.params`, the network that is exported).
Target: an EMA copy of the online parameters (`method_state['target_params']`) whose rate
rises from `byol.base_momentum` to 1 on BYOL's cosine schedule. Loss: the symmetric
`2 - 2 cos(q, stopgrad(z'))` over both views. BatchNorm in the encoder, projector and
predictor normalises over the global batch (the step runs on global arrays).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from simclr_jax import losses, models
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key


def config_defaults() -> ml_collections.ConfigDict:
    """`config.byol`: the paper's predictor and EMA settings."""
    c = ml_collections.ConfigDict()
    # Target EMA rate at step 0, raised to 1 on a cosine; -1: from the run length (the paper's
    # 0.996 on long runs, 0.99 on a few hundred steps).
    c.base_momentum = -1.0
    c.predictor_hidden_dim = 4096  # predictor MLP: Dense(hidden) -> BN -> ReLU -> Dense(out)
    return c


def base_momentum(config: ml_collections.ConfigDict, total_steps: int) -> float:
    """`byol.base_momentum`, or when it is -1 the run-length rule within [0.99, 0.996]."""
    m = float(config.byol.base_momentum)
    return base.auto_momentum(total_steps, 0.99, 0.996) if m < 0 else m


def validate(c: ml_collections.ConfigDict) -> None:
    """Base momentum in [0, 1) or -1, a positive predictor width."""
    b = c.byol
    check(
        0 <= b.base_momentum < 1 or b.base_momentum == -1,
        "byol.base_momentum",
        b.base_momentum,
        "in [0, 1), or -1 to derive it from the run length",
    )
    check(b.predictor_hidden_dim > 0, "byol.predictor_hidden_dim", b.predictor_hidden_dim, "> 0")


def resolve(c: ml_collections.ConfigDict, total_steps: int, num_train_examples: int) -> list[str]:
    """The EMA rate this run starts from, and a warning for an EMA longer than the run."""
    m = base_momentum(c, total_steps)
    lines = [f"BYOL: target EMA from {m:g} to 1 (cosine over {total_steps} steps)"]
    if c.byol.base_momentum >= 0:
        lines += base.ema_time_constant_warning(
            "byol.base_momentum", m, total_steps, base.auto_momentum(total_steps, 0.99, 0.996)
        )
    return lines


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, conv: Any = None
) -> models.SimCLRModel:
    """The online network: encoder + projection head + predictor (to the projection's size)."""
    predictor = models.Predictor(
        hidden_dim=config.byol.predictor_hidden_dim,
        out_dim=config.model.head_out_dim,
        dtype=models.compute_dtype(config.model.dtype),
    )
    return models.create_model(config, num_classes, predictor=predictor, conv=conv)


def init_state(config: Any, variables: dict[str, Any], key: jax.Array, n: int) -> dict[str, Any]:
    """The target network starts as a copy of the online one."""
    return {"target_params": variables["params"], "target_batch_stats": variables["batch_stats"]}


def target_projections(model: Any, method_state: dict[str, Any], x: jax.Array) -> tuple[Any, Any]:
    """The target network's stop-gradient projections of `x` and its new BN statistics."""
    out, stats = base.train_apply(
        model, method_state["target_params"], method_state["target_batch_stats"], x
    )
    return jax.lax.stop_gradient(out["projection"]), jax.lax.stop_gradient(stats)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: Any,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One BYOL update: loss of the online predictions -> optimizer -> EMA of the target."""
    total_steps = total_steps or int(config.total_steps)
    x = make_views(step_key(state), batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    b = labels.shape[0]
    ms = state.method_state
    z_target, target_stats = target_projections(model, ms, x)
    z_target = z_target.reshape(b, 2, -1)

    def loss_fn(params):
        out, new_stats = base.train_apply(model, params, state.batch_stats, x)
        q = out["prediction"].reshape(b, 2, -1)
        loss = losses.byol_loss(q[:, 0], q[:, 1], z_target[:, 0], z_target[:, 1])
        linear = online_linear_metrics(out["logits"].reshape(b, 2, -1), labels)
        z = out["projection"].reshape(b, 2, -1)
        aux = (loss, linear, new_stats, (z[:, 0], z[:, 1], out["features"]))
        return loss + linear["linear_loss"], aux

    grads, (loss, linear, batch_stats, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
    momentum = base.cosine_momentum(
        base_momentum(config, total_steps), True, state.step, total_steps, "byol.base_momentum"
    )
    new_state = base.apply_gradients(state, grads, tx, batch_stats=batch_stats)
    new_state = new_state.replace(
        method_state={
            "target_params": base.ema(ms["target_params"], new_state.params, momentum),
            "target_batch_stats": target_stats,
        }
    )
    metrics = base.step_metrics(
        state.step,
        new_state,
        grads,
        loss,
        {**linear, "ema_momentum": momentum},
        embeddings,
        schedule=schedule,
        config=config,
        total_steps=total_steps,
    )
    return new_state, metrics


METHOD = base.register(
    base.Method(
        name="byol",
        train_step=train_step,
        summary="BYOL: online predictor regresses an EMA target's projections (2 - 2 cos)",
        config_defaults=config_defaults,
        validate=validate,
        build_model=build_model,
        init_state=init_state,
        resolve=resolve,
    )
)
