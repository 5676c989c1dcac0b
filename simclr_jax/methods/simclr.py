"""SimCLR (Chen et al. 2020): NT-Xent over the global batch of both views.

Keys: `config.simclr.{temperature,loss_impl,loss_chunk_size,decoupled}` (until the per-method
sections they were the top-level `temperature` and `loss.*`; see `simclr_jax/config/moved.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from simclr_jax import losses
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key
from simclr_jax.runtime import parallel

# 'dense': each device's rows x the gathered batch; 'blockwise': the same value in chunks of
# candidate columns (an online log-sum-exp), for global batches whose logits do not fit.
LOSS_IMPLS = ("dense", "blockwise")


def sharded_nt_xent(
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
        raise ValueError(f"config.simclr.loss_impl={impl!r} is not one of {list(LOSS_IMPLS)}")
    return parallel.over_global_batch(loss_fn, mesh, temperature=temperature, decoupled=decoupled)


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
    """One SimCLR update: augment on device, encode 2B views with global BN, NT-Xent, LARS.

    Pure in `(state, batch)`; the step's key is derived from the state (see `step_key`).
    `total_steps` (default `config.total_steps`) makes the last step a monitor step too.
    """
    x = make_views(step_key(state), batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    batch_size = labels.shape[0]
    sc = config.simclr
    nt_xent = sharded_nt_xent(
        mesh,
        sc.temperature,
        decoupled=sc.decoupled,
        impl=sc.loss_impl,
        chunk_size=sc.loss_chunk_size,
    )

    def loss_fn(params):
        out, new_stats = base.train_apply(model, params, state.batch_stats, x)
        z = out["projection"].reshape(batch_size, 2, -1)
        loss, metrics = nt_xent(z[:, 0], z[:, 1])
        linear = online_linear_metrics(out["logits"].reshape(batch_size, 2, -1), labels)
        metrics = {**metrics, **linear}
        embeddings = (z[:, 0], z[:, 1], out["features"])
        aux = (loss, metrics, new_stats, embeddings)
        return loss + linear["linear_loss"], aux

    return base.gradient_update(
        state, loss_fn, tx, schedule=schedule, config=config, total_steps=total_steps
    )


def config_defaults() -> ml_collections.ConfigDict:
    """`config.simclr`: NT-Xent at SimCLR's ImageNet temperature, computed densely."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.1  # NT-Xent temperature
    c.loss_impl = "dense"  # one of LOSS_IMPLS
    c.loss_chunk_size = 1024  # candidate columns per block for loss_impl='blockwise'
    c.decoupled = False  # decoupled NT-Xent (DCL): the positive left out of the denominator
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Temperature > 0, a known loss implementation, a positive chunk size."""
    sc = c.simclr
    check(sc.temperature > 0, "simclr.temperature", sc.temperature, "> 0")
    check(
        sc.loss_impl in LOSS_IMPLS, "simclr.loss_impl", sc.loss_impl, f"one of {list(LOSS_IMPLS)}"
    )
    check(
        isinstance(sc.loss_chunk_size, int) and sc.loss_chunk_size > 0,
        "simclr.loss_chunk_size",
        sc.loss_chunk_size,
        "a positive integer",
    )


METHOD = base.register(
    base.Method(
        name="simclr",
        train_step=train_step,
        summary="NT-Xent over the global batch (SimCLR v1/v2)",
        config_defaults=config_defaults,
        validate=validate,
    )
)
