"""The pretraining train state and the pieces every objective's step shares: key, views, head."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from simclr_jax import augment


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: a resumed run restores exactly this."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # root PRNG key (raw uint32 data); step keys are fold_in(rng, step)
    # The method's extra state (a dict: EMA target, queue, bank), None when it has none.
    method_state: Any = None


def step_key(state: TrainState) -> jax.Array:
    """The step's PRNG key: fold_in(root, step), so a resumed run draws the same stream."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


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
