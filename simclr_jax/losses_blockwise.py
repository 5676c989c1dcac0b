"""NT-Xent over huge global batches without the `[2n, 2N]` logits: a blockwise log-sum-exp.

`losses.nt_xent_with_metrics` materialises each device's `[2n, 2N]` logits (n local rows, N global
rows): at a global batch of 64k views on one device that is 16 GiB in fp32, and autodiff keeps it
(and its softmax) for the backward. Here the gathered candidates are visited in chunks of
`chunk_size` columns with an online (running-max) log-sum-exp, and a custom VJP recomputes each
block in the backward, so at most `[2n, chunk_size]` logits exist at once and the residuals are
O((2n + 2N) x D). Values, metrics and gradients equal the dense loss up to fp32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from simclr_jax.losses import AxisName, anchors_and_candidates, global_mean

# The dense loss masks with this finite value; the same here keeps argmax ties identical.
_MASK_VALUE = -1e9
_HIGHEST = jax.lax.Precision.HIGHEST


def _varying(x: jnp.ndarray, axis_name: AxisName) -> jnp.ndarray:
    """`x` marked device-varying over `axis_name` inside shard_map (a no-op outside).

    The custom VJP returns a per-device cotangent for every input; marking a replicated input
    (the temperature) varying first makes autodiff sum those cotangents over devices.
    """
    if axis_name is None:
        return x
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    try:
        return jax.lax.pcast(x, axes, to="varying")
    except ValueError:  # already varying over these axes (a per-device temperature)
        return x


def _masks(
    k: jnp.ndarray, chunk: int, num_cols: int, self_col: jnp.ndarray, pos_col: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(self-or-padding mask, positive mask) of chunk `k`, each `[2n, chunk]`."""
    cols = k * chunk + jnp.arange(chunk)
    masked = (cols[None, :] == self_col[:, None]) | (cols[None, :] >= num_cols)
    return masked, cols[None, :] == pos_col[:, None]


def _online_update(carry: tuple, logits: jnp.ndarray, masked: jnp.ndarray) -> tuple:
    """One chunk of an online log-sum-exp: running max m, sum of exp(l - m), sum of exp(l - m) l."""
    m, s, t = carry
    logits = jnp.where(masked, _MASK_VALUE, logits)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    scale = jnp.exp(m - m_new)  # m starts at -inf: exp(-inf) = 0, never inf - inf
    e = jnp.where(masked, 0.0, jnp.exp(logits - m_new[:, None]))
    return m_new, s * scale + jnp.sum(e, -1), t * scale + jnp.sum(e * logits, -1)


def _forward_stats(
    anchors: jnp.ndarray,
    chunks: jnp.ndarray,
    temperature: jnp.ndarray,
    self_col: jnp.ndarray,
    pos_col: jnp.ndarray,
    num_cols: int,
    decoupled: bool,
) -> dict[str, jnp.ndarray]:
    """Per-anchor statistics of the masked softmax over all candidate chunks `[K, c, D]`."""
    chunk = chunks.shape[1]
    # Built from `anchors` (not fresh constants) so that inside shard_map the scan carry is
    # device-varying like the values the body produces.
    zeros = jnp.zeros_like(anchors[:, 0])
    neg_inf = jnp.full_like(zeros, -jnp.inf)

    def body(carry, xs):
        k, block = xs
        full, loss, best_val, best_idx = carry
        logits = jnp.dot(anchors, block.T, precision=_HIGHEST) / temperature  # [2n, c]
        masked, is_pos = _masks(k, chunk, num_cols, self_col, pos_col)
        full = _online_update(full, logits, masked)
        if decoupled:  # the loss's denominator leaves the positive out; metrics keep it
            loss = _online_update(loss, logits, masked | is_pos)
        # First index of the maximum, as jnp.argmax over the dense row: strict > across chunks.
        shown = jnp.where(masked, _MASK_VALUE, logits)
        local_val, local_idx = jnp.max(shown, -1), jnp.argmax(shown, -1) + k * chunk
        better = local_val > best_val
        best_val = jnp.where(better, local_val, best_val)
        best_idx = jnp.where(better, local_idx, best_idx)
        return (full, loss, best_val, best_idx), None

    init = (
        (neg_inf, zeros, zeros),
        (neg_inf, zeros, zeros),
        neg_inf,
        zeros.astype(jnp.int32),
    )
    ks = jnp.arange(chunks.shape[0])
    (full, loss, _, best_idx), _ = jax.lax.scan(body, init, (ks, chunks))
    if not decoupled:
        loss = full
    (m, s, t), (lm, ls, lt) = full, loss
    lse_full = m + jnp.log(s)
    return {
        "lse": lm + jnp.log(ls),  # log-sum-exp of the loss's denominator
        "mean_logit": lt / ls,  # E_p[logit] under the loss's softmax (for d/d temperature)
        "entropy": lse_full - t / s,  # -sum p log p of the full (self-masked) softmax
        "argmax": best_idx,
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise_lse(anchors, chunks, temperature, self_col, pos_col, num_cols, decoupled):
    """(log-sum-exp of the loss's denominator, entropy, argmax) per anchor; see _forward_stats."""
    st = _forward_stats(anchors, chunks, temperature, self_col, pos_col, num_cols, decoupled)
    return st["lse"], st["entropy"], st["argmax"]


def _blockwise_lse_fwd(anchors, chunks, temperature, self_col, pos_col, num_cols, decoupled):
    st = _forward_stats(anchors, chunks, temperature, self_col, pos_col, num_cols, decoupled)
    residuals = (anchors, chunks, temperature, self_col, pos_col, st["lse"], st["mean_logit"])
    return (st["lse"], st["entropy"], st["argmax"]), residuals


def _blockwise_lse_bwd(num_cols, decoupled, residuals, cotangents):
    """Recomputes each `[2n, c]` block: d lse_i = sum_j p_ij d logit_ij, block by block."""
    anchors, chunks, temperature, self_col, pos_col, lse, mean_logit = residuals
    g = cotangents[0]  # entropy and argmax are metrics under stop_gradient: no cotangent
    chunk = chunks.shape[1]

    def body(d_anchors, xs):
        k, block = xs
        logits = jnp.dot(anchors, block.T, precision=_HIGHEST) / temperature
        masked, is_pos = _masks(k, chunk, num_cols, self_col, pos_col)
        if decoupled:
            masked = masked | is_pos
        w = g[:, None] * jnp.where(masked, 0.0, jnp.exp(logits - lse[:, None]))
        d_anchors = d_anchors + jnp.dot(w, block, precision=_HIGHEST) / temperature
        return d_anchors, jnp.dot(w.T, anchors, precision=_HIGHEST) / temperature

    ks = jnp.arange(chunks.shape[0])
    d_anchors, d_chunks = jax.lax.scan(body, jnp.zeros_like(anchors), (ks, chunks))
    # logit = a.c / T, so d lse / dT = -E_p[logit] / T.
    d_temperature = jnp.sum(-g * mean_logit) / temperature
    d_temperature = jnp.reshape(d_temperature, jnp.shape(temperature)).astype(temperature.dtype)
    return d_anchors, d_chunks, d_temperature, None, None


_blockwise_lse.defvjp(_blockwise_lse_fwd, _blockwise_lse_bwd)


def nt_xent_blockwise_with_metrics(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    temperature: float,
    axis_name: AxisName = None,
    *,
    chunk_size: int = 1024,
    decoupled: bool = False,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`losses.nt_xent_with_metrics` holding at most `[2n, chunk_size]` logits at once.

    Same arguments, outputs and `axis_name` semantics (inside `shard_map`, negatives come from
    every device and host, and gradients sum every device's contribution). The 2N candidate
    columns are visited `chunk_size` at a time; a last chunk that does not divide 2N is padded
    and masked. Returns `(loss, {'contrastive_acc', 'entropy'})`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be > 0")
    # The gather's transpose is a reduce-scatter, so each shard's gradient sums every device's
    # anchors' contributions; the custom VJP below sits after the gather, so this still holds.
    anchors, candidates, self_col, pos_col = anchors_and_candidates(z1, z2, temperature, axis_name)
    num_cols = candidates.shape[0]
    chunk = min(chunk_size, num_cols)
    num_chunks = -(-num_cols // chunk)
    pad = num_chunks * chunk - num_cols
    chunks = jnp.pad(candidates, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
    temperature = _varying(jnp.asarray(temperature, jnp.float32), axis_name)
    lse, entropy, argmax = _blockwise_lse(
        anchors, chunks, temperature, self_col, pos_col, num_cols, decoupled
    )
    # Each anchor's positive is the other view of the same local example: no gather needed.
    n = anchors.shape[0] // 2
    positives = jnp.concatenate([anchors[n:], anchors[:n]], axis=0)
    pos_logit = jnp.sum(anchors * positives, axis=-1) / temperature
    correct = (argmax == pos_col).astype(jnp.float32)
    metrics = {
        "contrastive_acc": global_mean(jax.lax.stop_gradient(correct), axis_name),
        "entropy": global_mean(jax.lax.stop_gradient(entropy), axis_name),
    }
    return global_mean(lse - pos_logit, axis_name), metrics


def nt_xent_blockwise(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    temperature: float,
    axis_name: AxisName = None,
    *,
    chunk_size: int = 1024,
    decoupled: bool = False,
) -> jnp.ndarray:
    """SimCLR NT-Xent (`losses.nt_xent`) computed blockwise; see nt_xent_blockwise_with_metrics."""
    return nt_xent_blockwise_with_metrics(
        z1, z2, temperature, axis_name, chunk_size=chunk_size, decoupled=decoupled
    )[0]
