"""Local-global mutual-information losses: Deep InfoMax's InfoNCE and JSD estimators.

Deep InfoMax (Hjelm et al. 2019) scores a global code `g_i` against every local feature
`l_{j,m}` (image j, position m) of the global batch with a dot product. The pairs (i, i, m) are
positives; (i, j, m') with j != i are negatives. Inside `shard_map` with `axis_name` each shard
holds its images' codes and locals, the locals are gathered, and the results equal the unsharded
call on the gathered arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simclr_jax.losses import AxisName, _gather, global_mean, l2_normalize

_NEG_INF = -1e9


def _prepare(x: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """Raw codes (temperature 0: the papers' dot-product scores) or unit codes / sqrt(T)."""
    if temperature == 0:
        return x.astype(jnp.float32)
    return l2_normalize(x) / jnp.sqrt(jnp.float32(temperature))


def _scores(
    g: jnp.ndarray, loc: jnp.ndarray, axis_name: AxisName, temperature: float = 0.0
) -> tuple[jnp.ndarray, ...]:
    """(scores [n, N, M] of local codes against every gathered local, positive mask [n, N])."""
    if g.ndim != 2 or loc.ndim != 3 or loc.shape[0] != g.shape[0] or loc.shape[2] != g.shape[1]:
        raise ValueError(f"g must be [N, D] and loc [N, M, D]; got {g.shape} and {loc.shape}")
    big_l, offset = _gather(_prepare(loc, temperature), axis_name)
    s = jnp.einsum(
        "id,jmd->ijm", _prepare(g, temperature), big_l, precision=jax.lax.Precision.HIGHEST
    )
    own = jnp.arange(g.shape[0]) + offset
    pos_mask = own[:, None] == jnp.arange(big_l.shape[0])[None, :]
    return s, pos_mask


def dim_infonce(
    g: jnp.ndarray, loc: jnp.ndarray, axis_name: AxisName = None, temperature: float = 0.0
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """DIM's InfoNCE: for each (i, m), `-log softmax` of `g_i . l_{i,m}` against `g_i . l_{j,m'}`.

    The negatives of anchor i are every position of every other image, shared by its M
    positives (as in the paper's code). `temperature` 0: raw dot-product scores (the paper's);
    T > 0: cosine similarities / T. Returns (mean loss over all N x M positives, metrics:
    `dim_acc`, the fraction of positives scoring above all their negatives).
    """
    s, pos_mask = _scores(g, loc, axis_name, temperature)
    pos = jnp.sum(jnp.where(pos_mask[:, :, None], s, 0.0), axis=1)  # [n, M]
    neg = jnp.where(pos_mask[:, :, None], _NEG_INF, s)
    neg_lse = jax.nn.logsumexp(neg.reshape(neg.shape[0], -1), axis=-1)  # [n]
    per_pos = jnp.logaddexp(pos, neg_lse[:, None]) - pos
    neg_max = jax.lax.stop_gradient(jnp.max(neg.reshape(neg.shape[0], -1), axis=-1))
    correct = (jax.lax.stop_gradient(pos) > neg_max[:, None]).astype(jnp.float32)
    return global_mean(per_pos, axis_name), {"dim_acc": global_mean(correct, axis_name)}


def dim_jsd(
    g: jnp.ndarray, loc: jnp.ndarray, axis_name: AxisName = None, temperature: float = 0.0
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """DIM's Jensen-Shannon estimator: `E_pos[softplus(-s)] + E_neg[softplus(s)]`.

    Positives are the N x M pairs (g_i, l_{i,m}); negatives all N x (N - 1) x M pairs (g_i,
    l_{j,m'}), j != i, each set averaged on its own. Metrics: `dim_acc` as in `dim_infonce`.
    """
    s, pos_mask = _scores(g, loc, axis_name, temperature)
    m = s.shape[2]
    big_n = s.shape[1]
    mask = pos_mask[:, :, None]
    pos_term = jnp.sum(jnp.where(mask, jax.nn.softplus(-s), 0.0), axis=(1, 2)) / m  # [n]
    neg_term = jnp.sum(jnp.where(mask, 0.0, jax.nn.softplus(s)), axis=(1, 2)) / (
        m * max(big_n - 1, 1)
    )
    pos = jnp.sum(jnp.where(mask, s, 0.0), axis=1)
    neg_max = jax.lax.stop_gradient(jnp.max(jnp.where(mask, _NEG_INF, s), axis=(1, 2)))
    correct = (jax.lax.stop_gradient(pos) > neg_max[:, None]).astype(jnp.float32)
    loss = global_mean(pos_term + neg_term, axis_name)
    return loss, {"dim_acc": global_mean(correct, axis_name)}


ESTIMATORS = {"infonce": dim_infonce, "jsd": dim_jsd}


def cpc_infonce(
    pred: jnp.ndarray,
    z: jnp.ndarray,
    targets: jnp.ndarray,
    axis_name: AxisName = None,
    temperature: float = 0.0,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """CPC's InfoNCE: each prediction against every patch of the global batch.

    `pred [N, P, D]`: P predictions per image; `z [N, Q, D]`: the Q patch features of each image;
    `targets [P]` int: the patch (of the same image) that prediction p predicts. Logits are dot
    products with all N x Q patches, the target's column the positive (CPC v2's negatives: the
    other patches of the batch, same image included); `temperature` as in `dim_infonce`.
    Returns (mean cross-entropy over N x P predictions, metrics: `cpc_acc`, the fraction whose
    target scores highest).
    """
    if pred.ndim != 3 or z.ndim != 3 or pred.shape[0] != z.shape[0] or pred.shape[2] != z.shape[2]:
        raise ValueError(f"pred must be [N, P, D] and z [N, Q, D]; got {pred.shape}, {z.shape}")
    if targets.shape != (pred.shape[1],):
        raise ValueError(f"targets must be [P] = [{pred.shape[1]}]; got {targets.shape}")
    q = z.shape[1]
    big_z, offset = _gather(_prepare(z, temperature).reshape(-1, z.shape[2]), axis_name)
    logits = jnp.einsum(
        "npd,kd->npk", _prepare(pred, temperature), big_z, precision=jax.lax.Precision.HIGHEST
    )
    own = offset // q + jnp.arange(pred.shape[0])
    pos_col = own[:, None] * q + jnp.asarray(targets)[None, :]  # [N, P]
    pos = jnp.take_along_axis(logits, pos_col[:, :, None], axis=-1)[..., 0]
    per_pred = jax.nn.logsumexp(logits, axis=-1) - pos
    correct = (jnp.argmax(logits, axis=-1) == pos_col).astype(jnp.float32)
    return global_mean(per_pred, axis_name), {
        "cpc_acc": global_mean(jax.lax.stop_gradient(correct), axis_name)
    }
