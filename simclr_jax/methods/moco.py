"""MoCo v2 (Chen, Fan, Girshick, He 2020) on the SimCLR pipeline: `config.method = 'moco'`.

The query encoder + projection head is the usual `SimCLRModel` (`state.params`, the network that
is evaluated and exported). A momentum (EMA) copy of it encodes the keys, and a FIFO queue of the
last K L2-normalised keys supplies the negatives. All three live in `TrainState.method_state`:

    {'key_params', 'key_batch_stats', 'queue' [K, D] fp32, 'queue_ptr' int32 scalar}

so they are replicated, donated, checkpointed and restored with the rest of the state.

BatchNorm: the step runs on global arrays, so both encoders normalise with statistics of the
whole global batch (all devices and hosts). No per-device sub-batch shares statistics with its
positives, which is the leak MoCo's shuffled BN exists to break; see docs/methods.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax import losses, models
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key
from simclr_jax.runtime import parallel

log = logging.getLogger(__name__)
_capped_warned: set[tuple[int, int]] = set()  # warn once per setting, not per state build


def queue_size(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """The queue length K: `config.moco.queue_size`, capped to the pretraining split's size.

    A queue longer than the dataset holds several keys of the same image, so an example's own
    earlier key becomes a negative; the cap (largest multiple of the batch that fits the split)
    keeps `--config.method=moco` usable on small datasets with the ImageNet default of 65536.
    """
    k, b = int(config.moco.queue_size), int(config.batch_size)
    if k <= 0 or k % b:
        raise ValueError(
            f"config.moco.queue_size={k} must be a positive multiple of the global batch size "
            f"batch_size={b} (each step enqueues one global batch of keys); "
            f"try {max(b, k // b * b)}"
        )
    cap = max(b, num_train_examples // b * b)
    if k > cap:
        if (k, cap) not in _capped_warned:
            _capped_warned.add((k, cap))
            log.warning(
                "moco.queue_size=%d exceeds the %d pretraining examples; using a queue of %d keys",
                k,
                num_train_examples,
                cap,
            )
        return cap
    return k


def init_moco_state(
    config: ml_collections.ConfigDict,
    variables: dict[str, Any],
    key: jax.Array,
    num_keys: int,
) -> dict[str, Any]:
    """The key encoder as a copy of the query encoder, and a queue of `num_keys` random unit keys.

    Random keys (as in MoCo) are harmless negatives that the first K / batch_size steps overwrite.
    """
    queue = jax.random.normal(key, (num_keys, config.model.head_out_dim), jnp.float32)
    return {
        "key_params": variables["params"],
        "key_batch_stats": variables["batch_stats"],
        "queue": losses.l2_normalize(queue),
        "queue_ptr": jnp.zeros((), jnp.int32),
    }


def momentum(config: ml_collections.ConfigDict, total_steps: int) -> float:
    """The key encoder's (base) EMA rate: `moco.momentum`, or when it is -1 the run-length rule.

    The rule (`base.auto_momentum`) gives MoCo's 0.999 on ImageNet-length runs and 0.99 on a
    400-step digits run, where 0.999 would leave the key encoder near its random init.
    """
    m = float(config.moco.momentum)
    return base.auto_momentum(total_steps, 0.99, 0.999) if m < 0 else m


def momentum_at(config: ml_collections.ConfigDict, step: jax.Array, total_steps: int) -> jax.Array:
    """Key-encoder EMA rate at `step`: `momentum(...)`, or BYOL's cosine increase to 1."""
    return base.cosine_momentum(
        momentum(config, total_steps),
        config.moco.momentum_cosine,
        step,
        total_steps,
        "moco.momentum_cosine",
    )


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes `keys [B, D]` at `ptr` (overwriting the oldest B rows); returns (queue, new ptr).

    `keys` is the global batch's; K is a multiple of B, so a write never wraps.
    """
    num_keys, b = queue.shape[0], keys.shape[0]
    if num_keys % b:
        raise ValueError(f"queue of {num_keys} keys is not a multiple of the batch of {b} keys")
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.int32(0)))
    return queue, (ptr + b) % num_keys


def key_embeddings(
    model: models.SimCLRModel, key_params: Any, key_batch_stats: Any, x: jax.Array
) -> tuple[jax.Array, Any]:
    """L2-normalised, stop-gradient projections of the key encoder, and its new BN statistics.

    Train-mode BN (global batch statistics), as MoCo runs its key encoder in train mode.
    """
    out, new_stats = base.train_apply(model, key_params, key_batch_stats, x)
    keys = jax.lax.stop_gradient(losses.l2_normalize(out["projection"]))
    return keys, jax.lax.stop_gradient(new_stats)


def _sharded_info_nce(
    mesh: Mesh, temperature: float
) -> Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """InfoNCE with each device's queries x the replicated queue: logits stay [B/n, 1 + K]."""
    return jax.shard_map(
        functools.partial(losses.info_nce, temperature=temperature, axis_name=parallel.DATA_AXIS),
        mesh=mesh,
        in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS), P()),
        out_specs=(P(), P()),
    )


def moco_loss(
    params: Any,
    state: TrainState,
    x_q: jax.Array,
    x_k: jax.Array,
    labels: jax.Array,
    *,
    model: models.SimCLRModel,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> tuple[jax.Array, dict[str, Any]]:
    """MoCo's InfoNCE (+ the online linear head's loss) of query `params`; keys get no gradient.

    Queries encode view `x_q`; keys are the momentum encoder's embeddings of view `x_k`
    (`state.method_state`), stopped from gradients, and the queue supplies the negatives.
    Returns `(total loss, aux)` with the InfoNCE loss, metrics, embeddings and new BN statistics.
    """
    ms = state.method_state
    keys, key_batch_stats = key_embeddings(model, ms["key_params"], ms["key_batch_stats"], x_k)
    out, new_stats = base.train_apply(model, params, state.batch_stats, x_q)
    info_nce = _sharded_info_nce(mesh, config.moco.temperature)
    loss, acc = info_nce(out["projection"], keys, jax.lax.stop_gradient(ms["queue"]))
    linear = online_linear_metrics(out["logits"][:, None], labels)
    aux = {
        "loss": loss,
        "metrics": {"contrastive_acc": acc, **linear},
        "queries": out["projection"],
        "features": out["features"],
        "keys": keys,
        "batch_stats": new_stats,
        "key_batch_stats": key_batch_stats,
    }
    return loss + linear["linear_loss"], aux


def moco_train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: models.SimCLRModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One MoCo v2 update: the contract of every method step (pure, key from the state).

    Order: InfoNCE of queries against [key, queue] -> optimizer update of the query encoder ->
    EMA of the key encoder towards the updated query encoder -> enqueue this step's global keys.
    """
    total_steps = total_steps or int(config.total_steps)
    key = step_key(state)
    x = make_views(key, batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    # make_views interleaves the two views of each image: rows 2i (queries), 2i + 1 (keys).
    pairs = x.reshape((labels.shape[0], 2) + x.shape[1:])
    x_q, x_k = pairs[:, 0], pairs[:, 1]

    loss_fn = functools.partial(moco_loss, model=model, config=config, mesh=mesh)
    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params, state, x_q, x_k, labels)
    ms = state.method_state
    momentum = momentum_at(config, state.step, total_steps)
    queue, queue_ptr = enqueue(ms["queue"], ms["queue_ptr"], aux["keys"])
    new_state = base.apply_gradients(state, grads, tx, batch_stats=aux["batch_stats"])
    new_state = new_state.replace(
        method_state={
            "key_params": base.ema(ms["key_params"], new_state.params, momentum),
            "key_batch_stats": aux["key_batch_stats"],
            "queue": queue,
            "queue_ptr": queue_ptr,
        }
    )
    metrics = base.step_metrics(
        state.step,
        new_state,
        grads,
        aux["loss"],
        {**aux["metrics"], "moco_momentum": momentum},
        (aux["queries"], aux["keys"], aux["features"]),
        schedule=schedule,
        config=config,
        total_steps=total_steps,
    )
    return new_state, metrics


def config_defaults() -> ml_collections.ConfigDict:
    """`config.moco`: MoCo v2's ImageNet settings; the EMA rate follows the run length."""
    c = ml_collections.ConfigDict()
    # EMA rate of the key encoder; -1: from the run length (0.999 on ImageNet-length runs,
    # 0.99 on a few hundred steps), see `momentum`.
    c.momentum = -1.0
    c.momentum_cosine = False  # raise the momentum to 1 on a cosine schedule
    c.queue_size = 65536  # negatives kept from earlier global batches (capped to the split)
    c.temperature = 0.2
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Queue a positive multiple of the global batch, momentum in [0, 1) or -1, temperature > 0."""
    mc = c.moco
    check(
        isinstance(mc.queue_size, int) and mc.queue_size > 0 and mc.queue_size % c.batch_size == 0,
        "moco.queue_size",
        mc.queue_size,
        f"a positive multiple of batch_size={c.batch_size} (one global batch of keys is "
        f"enqueued per step), e.g. {max(1, mc.queue_size // c.batch_size) * c.batch_size}",
    )
    check(
        0 <= mc.momentum < 1 or mc.momentum == -1,
        "moco.momentum",
        mc.momentum,
        "in [0, 1), or -1 to derive it from the run length",
    )
    check(mc.temperature > 0, "moco.temperature", mc.temperature, "> 0")


def resolve(c: ml_collections.ConfigDict, total_steps: int, num_train_examples: int) -> list[str]:
    """The queue and EMA rate this run uses, and a warning for an EMA longer than the run."""
    m = momentum(c, total_steps)
    lines = [f"MoCo: queue of {queue_size(c, num_train_examples)} keys, key-encoder EMA {m:g}"]
    if c.moco.momentum >= 0:
        lines += base.ema_time_constant_warning(
            "moco.momentum", m, total_steps, base.auto_momentum(total_steps, 0.99, 0.999)
        )
    return lines


def init_state(
    config: ml_collections.ConfigDict, variables: dict[str, Any], key: jax.Array, n: int
) -> dict[str, Any]:
    """The registry's hook: `init_moco_state` with the queue sized for `n` training examples."""
    return init_moco_state(config, variables, key, queue_size(config, n))


METHOD = base.register(
    base.Method(
        name="moco",
        train_step=moco_train_step,
        summary="MoCo v2: InfoNCE against an EMA key encoder's FIFO queue of global keys",
        config_defaults=config_defaults,
        validate=validate,
        init_state=init_state,
        resolve=resolve,
    )
)
