"""Contrastive losses: SimCLR's NT-Xent over the global batch (plain or decoupled) and its
metrics, InfoNCE with explicit negatives (MoCo) or the global batch's keys (MoCo v3), and the
margin contrastive and triplet losses."""

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


def global_mean(x: jnp.ndarray, axis_name: AxisName) -> jnp.ndarray:
    """Mean over local rows, then over shards (all shards hold equally many rows)."""
    x = jnp.mean(x)
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def anchors_and_candidates(
    z1: jnp.ndarray, z2: jnp.ndarray, temperature: float, axis_name: AxisName = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Checks inputs; returns (local anchors [2n, D], global candidates [2N, D], self/pos columns).

    Anchors are this shard's L2-normalised rows `[z1; z2]`; candidates are the gathered global
    views `[z1_global; z2_global]`; `self_col`/`pos_col` give each anchor's own and positive column.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {z1.shape} and {z2.shape}")
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
    g1, offset = _gather(z1, axis_name)
    g2, _ = _gather(z2, axis_name)
    big_n = g1.shape[0]
    local = jnp.arange(z1.shape[0]) + offset
    self_col = jnp.concatenate([local, local + big_n])
    pos_col = jnp.concatenate([local + big_n, local])
    anchors = jnp.concatenate([z1, z2], axis=0)
    return anchors, jnp.concatenate([g1, g2], axis=0), self_col, pos_col


def nt_xent_logits(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    temperature: float,
    axis_name: AxisName = None,
    *,
    decoupled: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Local anchors' masked logits against all 2N global views, and each anchor's positive column.

    Anchors are this shard's rows of both views (`[2n, D]`); candidates are the gathered global
    views ordered `[z1_global; z2_global]` (`[2N, D]`). Memory is O(2n x 2N), never 2N x 2N on
    one device. Self-similarity is masked out; with `decoupled=True` the positive column is masked
    too, so the logits are exactly the decoupled loss's denominator (Yeh et al. 2021).
    """
    anchors, candidates, self_col, pos_col = anchors_and_candidates(z1, z2, temperature, axis_name)
    logits = jnp.dot(anchors, candidates.T, precision=jax.lax.Precision.HIGHEST) / temperature
    num_cols = candidates.shape[0]
    mask = jax.nn.one_hot(self_col, num_cols, dtype=bool)
    if decoupled:
        mask |= jax.nn.one_hot(pos_col, num_cols, dtype=bool)
    return jnp.where(mask, _MASK_VALUE, logits), pos_col


def nt_xent_with_metrics(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    temperature: float,
    axis_name: AxisName = None,
    *,
    decoupled: bool = False,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """NT-Xent loss plus SimCLR's metrics: contrastive accuracy and softmax entropy.

    Returns `(loss, {'contrastive_acc', 'entropy'})`, all means over the 2N global anchors.
    `decoupled=True` leaves the positive out of the loss's denominator (DCL, Yeh et al. 2021:
    `log sum_neg exp(s/t) - s_pos/t`, which can be negative); the metrics keep the full softmax.
    """
    logits, pos_col = nt_xent_logits(z1, z2, temperature, axis_name)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if decoupled:
        pos_logit = jnp.take_along_axis(logits, pos_col[:, None], axis=-1)[:, 0]
        pos_mask = jax.nn.one_hot(pos_col, logits.shape[-1], dtype=bool)
        negatives = jnp.where(pos_mask, _MASK_VALUE, logits)
        per_anchor = jax.nn.logsumexp(negatives, axis=-1) - pos_logit
    else:
        per_anchor = -jnp.take_along_axis(log_probs, pos_col[:, None], axis=-1)[:, 0]
    probs = jnp.exp(log_probs)
    entropy = -jnp.sum(probs * log_probs, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == pos_col).astype(jnp.float32)
    metrics = {
        "contrastive_acc": global_mean(jax.lax.stop_gradient(correct), axis_name),
        "entropy": global_mean(jax.lax.stop_gradient(entropy), axis_name),
    }
    return global_mean(per_anchor, axis_name), metrics


def nt_xent(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    temperature: float,
    axis_name: AxisName = None,
    *,
    decoupled: bool = False,
) -> jnp.ndarray:
    """SimCLR NT-Xent: mean over the 2N anchors of -log softmax of the positive among 2N-1 views.

    `z1[i]` and `z2[i]` are a positive pair. Inside `shard_map` with `axis_name`, negatives come
    from the global batch (all devices and hosts) and the value equals the unsharded call on the
    gathered arrays. `decoupled=True`: the positive leaves the denominator (see
    `nt_xent_with_metrics`).
    """
    return nt_xent_with_metrics(z1, z2, temperature, axis_name, decoupled=decoupled)[0]


def info_nce(
    q: jnp.ndarray,
    k: jnp.ndarray,
    queue: jnp.ndarray,
    temperature: float,
    axis_name: AxisName = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """InfoNCE with explicit negatives (MoCo): each query against its key and all K queue rows.

    Logits are `[q_i . k_i, q_i . queue^T] / temperature` with the positive in column 0, on
    L2-normalised `q [N, D]`, `k [N, D]`, `queue [K, D]`. Returns `(mean cross-entropy, accuracy)`
    over the queries. Gradients flow wherever the caller lets them (MoCo stops them on `k` and
    `queue`). Inside `shard_map` with `axis_name`, `q`/`k` are this shard's rows, `queue` is
    replicated, and both means are over the global batch.
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [N, D]; got {q.shape} and {k.shape}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be [K, {q.shape[1]}]; got {queue.shape}")
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    q, k, queue = l2_normalize(q), l2_normalize(k), l2_normalize(queue)
    pos = jnp.sum(q * k, axis=-1, keepdims=True)
    neg = jnp.dot(q, queue.T, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.concatenate([pos, neg], axis=-1) / temperature
    per_query = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)
    return global_mean(per_query, axis_name), global_mean(jax.lax.stop_gradient(correct), axis_name)


def batch_info_nce(
    q: jnp.ndarray, k: jnp.ndarray, temperature: float, axis_name: AxisName = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """InfoNCE of each query against the global batch of keys, no queue (MoCo v3).

    Logits are `q_i . k_j / temperature` over every key `j` of the global batch (gathered over
    `axis_name` inside `shard_map`), on L2-normalised `q [n, D]`, `k [n, D]`; query i's positive
    is the key of the same example, the other N - 1 keys are its negatives. Returns
    `(mean cross-entropy, accuracy)` over the global batch. Unscaled: MoCo v3 multiplies by 2T.
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [N, D]; got {q.shape} and {k.shape}")
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    q = l2_normalize(q)
    keys, offset = _gather(l2_normalize(k), axis_name)
    logits = jnp.dot(q, keys.T, precision=jax.lax.Precision.HIGHEST) / temperature
    pos_col = jnp.arange(q.shape[0]) + offset
    pos = jnp.take_along_axis(logits, pos_col[:, None], axis=-1)[:, 0]
    per_query = jax.nn.logsumexp(logits, axis=-1) - pos
    correct = (jnp.argmax(logits, axis=-1) == pos_col).astype(jnp.float32)
    return global_mean(per_query, axis_name), global_mean(jax.lax.stop_gradient(correct), axis_name)


def _safe_norm(sq: jnp.ndarray) -> jnp.ndarray:
    """sqrt of squared distances with a zero (not NaN) gradient at distance 0."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _sq_dist(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(d * d, axis=-1)


def margin_contrastive(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    same: jnp.ndarray,
    margin: float,
    axis_name: AxisName = None,
) -> jnp.ndarray:
    """Margin contrastive loss on pairs (Hadsell, Chopra, LeCun 2006), mean over the N pairs.

    `same[i]` (bool or {0, 1}) marks `(z1[i], z2[i])` as similar: loss `d^2 / 2`; dissimilar
    pairs pay `max(0, margin - d)^2 / 2`, with `d` the Euclidean distance of the embeddings as
    given (L2-normalise first for a margin on the sphere). With `axis_name`, the global mean.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or same.shape != z1.shape[:1]:
        raise ValueError(
            f"need z1, z2 [N, D] and same [N]; got {z1.shape}, {z2.shape}, {same.shape}"
        )
    sq = _sq_dist(z1, z2)
    same = same.astype(jnp.float32)
    per_pair = 0.5 * (same * sq + (1.0 - same) * jnp.square(jax.nn.relu(margin - _safe_norm(sq))))
    return global_mean(per_pair, axis_name)


def triplet(
    anchor: jnp.ndarray,
    positive: jnp.ndarray,
    negative: jnp.ndarray,
    margin: float,
    axis_name: AxisName = None,
    *,
    squared: bool = True,
) -> jnp.ndarray:
    """Triplet loss `mean max(0, d(a, p) - d(a, n) + margin)` over N triplets (rows).

    `squared=True` uses squared Euclidean distances (FaceNet, Schroff et al. 2015), False plain
    Euclidean ones. Embeddings are used as given. With `axis_name`, the global mean.
    """
    if not anchor.shape == positive.shape == negative.shape or anchor.ndim != 2:
        raise ValueError(
            f"anchor, positive, negative must all be [N, D]; got {anchor.shape}, "
            f"{positive.shape}, {negative.shape}"
        )
    d_pos, d_neg = _sq_dist(anchor, positive), _sq_dist(anchor, negative)
    if not squared:
        d_pos, d_neg = _safe_norm(d_pos), _safe_norm(d_neg)
    return global_mean(jax.nn.relu(d_pos - d_neg + margin), axis_name)


def cosine_similarity(p: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
    """Row-wise cosine similarity `[N]` of `p [N, D]` and `z [N, D]` (fp32)."""
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"p and z must both be [N, D]; got {p.shape} and {z.shape}")
    return jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1)


def byol_loss(
    p1: jnp.ndarray,
    p2: jnp.ndarray,
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    axis_name: AxisName = None,
) -> jnp.ndarray:
    """BYOL's symmetric loss: mean over N of `(2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1))`.

    `p1, p2` are the online predictions of views 1 and 2, `z1, z2` the target projections;
    the targets get no gradient. With `axis_name`, the mean is over the global batch.
    """
    z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    per_example = 4.0 - 2.0 * cosine_similarity(p1, z2) - 2.0 * cosine_similarity(p2, z1)
    return global_mean(per_example, axis_name)


def simsiam_loss(
    p1: jnp.ndarray,
    p2: jnp.ndarray,
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    axis_name: AxisName = None,
    *,
    stop_gradient: bool = True,
) -> jnp.ndarray:
    """SimSiam's loss: mean over N of `-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2`, in [-1, 1].

    `stop_gradient=False` lets gradients into the projections too: the variant that collapses
    (Chen & He 2021, Fig. 2). With `axis_name`, the mean is over the global batch.
    """
    if stop_gradient:
        z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    per_example = -0.5 * (cosine_similarity(p1, z2) + cosine_similarity(p2, z1))
    return global_mean(per_example, axis_name)


def instdisc_nce(
    q: jnp.ndarray,
    k: jnp.ndarray,
    negatives: jnp.ndarray,
    temperature: float,
    log_z: jnp.ndarray,
    num_data: int | jnp.ndarray,
    axis_name: AxisName = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """InstDisc's NCE loss (Wu et al. 2018, eq. 6): the positive vs K noise samples.

    With `P(i|v) = exp(v_i . f / t) / Z` (Z = `exp(log_z)`) and uniform noise `P_n = 1/n` for
    `n = num_data` examples, `h(i, f) = P(i|f) / (P(i|f) + K P_n)`; the loss per query is
    `-log h(pos) - sum_K log(1 - h(neg))`, here in log space. `q [N, D]` queries,
    `k [N, D]` their positives (bank rows), `negatives [K, D]` shared by all queries; all are
    L2-normalised here. Returns `(mean loss, accuracy of the positive among the K + 1)`; with
    `axis_name`, means over the global batch.
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [N, D]; got {q.shape} and {k.shape}")
    if negatives.ndim != 2 or negatives.shape[1] != q.shape[1]:
        raise ValueError(f"negatives must be [K, {q.shape[1]}]; got {negatives.shape}")
    q, k, negatives = l2_normalize(q), l2_normalize(k), l2_normalize(negatives)
    pos = jnp.sum(q * k, axis=-1) / temperature
    neg = jnp.dot(q, negatives.T, precision=jax.lax.Precision.HIGHEST) / temperature
    log_noise = jnp.log(negatives.shape[0] / jnp.asarray(num_data, jnp.float32))  # log K P_n
    lp_pos, lp_neg = pos - log_z, neg - log_z  # log P(i|f)
    per_query = -(lp_pos - jnp.logaddexp(lp_pos, log_noise)) - jnp.sum(
        log_noise - jnp.logaddexp(lp_neg, log_noise), axis=-1
    )
    correct = (pos > jnp.max(neg, axis=-1)).astype(jnp.float32)
    return global_mean(per_query, axis_name), global_mean(jax.lax.stop_gradient(correct), axis_name)
