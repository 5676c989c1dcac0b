"""Contrastive losses over the global batch: SimCLR's NT-Xent and its metrics."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

AxisName = str | Sequence[str] | None

# Large but finite: -inf would turn 0 * -inf into NaN in the entropy and in gradients.
_MASK_VALUE = -1e9


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """Rows scaled to unit L2 norm (fp32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _gather(x: jnp.ndarray, axis_name: AxisName) -> tuple[jnp.ndarray, jnp.ndarray]:
    """All-gathers rows over `axis_name`; returns (global rows, this shard's row offset)."""
    if axis_name is None:
        return x, jnp.zeros((), jnp.int32)
    # all_gather's transpose is a reduce-scatter, so each shard's gradient sums the
    # contributions of every device's anchors (the pitfall some libraries hit).
    gathered = jax.lax.all_gather(x, axis_name, tiled=True)
    return gathered, jax.lax.axis_index(axis_name) * x.shape[0]


def _mean(x: jnp.ndarray, axis_name: AxisName) -> jnp.ndarray:
    """Mean over local rows, then over shards (all shards hold equally many rows)."""
    x = jnp.mean(x)
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def nt_xent_logits(
    z1: jnp.ndarray, z2: jnp.ndarray, temperature: float, axis_name: AxisName = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Local anchors' masked logits against all 2N global views, and each anchor's positive column.

    Anchors are this shard's rows of both views (`[2n, D]`); candidates are the gathered global
    views ordered `[z1_global; z2_global]` (`[2N, D]`). Memory is O(2n x 2N), never 2N x 2N on
    one device. Self-similarity is masked out.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {z1.shape} and {z2.shape}")
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
    n = z1.shape[0]
    g1, offset = _gather(z1, axis_name)
    g2, _ = _gather(z2, axis_name)
    big_n = g1.shape[0]
    anchors = jnp.concatenate([z1, z2], axis=0)
    candidates = jnp.concatenate([g1, g2], axis=0)
    logits = jnp.dot(anchors, candidates.T, precision=jax.lax.Precision.HIGHEST) / temperature
    local = jnp.arange(n) + offset
    self_col = jnp.concatenate([local, local + big_n])
    pos_col = jnp.concatenate([local + big_n, local])
    self_mask = jax.nn.one_hot(self_col, 2 * big_n, dtype=bool)
    return jnp.where(self_mask, _MASK_VALUE, logits), pos_col


def nt_xent_with_metrics(
    z1: jnp.ndarray, z2: jnp.ndarray, temperature: float, axis_name: AxisName = None
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """NT-Xent loss plus SimCLR's metrics: contrastive accuracy and softmax entropy.

    Returns `(loss, {'contrastive_acc', 'entropy'})`, all means over the 2N global anchors.
    """
    logits, pos_col = nt_xent_logits(z1, z2, temperature, axis_name)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    per_anchor = -jnp.take_along_axis(log_probs, pos_col[:, None], axis=-1)[:, 0]
    probs = jnp.exp(log_probs)
    entropy = -jnp.sum(probs * log_probs, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == pos_col).astype(jnp.float32)
    metrics = {
        "contrastive_acc": _mean(jax.lax.stop_gradient(correct), axis_name),
        "entropy": _mean(jax.lax.stop_gradient(entropy), axis_name),
    }
    return _mean(per_anchor, axis_name), metrics


def nt_xent(
    z1: jnp.ndarray, z2: jnp.ndarray, temperature: float, axis_name: AxisName = None
) -> jnp.ndarray:
    """SimCLR NT-Xent: mean over the 2N anchors of -log softmax of the positive among 2N-1 views.

    `z1[i]` and `z2[i]` are a positive pair. Inside `shard_map` with `axis_name`, negatives come
    from the global batch (all devices and hosts) and the value equals the unsharded call on the
    gathered arrays.
    """
    return nt_xent_with_metrics(z1, z2, temperature, axis_name)[0]
