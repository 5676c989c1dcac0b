"""Label-free representation monitors that warn of collapse: alignment, uniformity, RankMe.

Alignment and uniformity are Wang & Isola (2020) on L2-normalised embeddings; RankMe (Garrido et
al. 2023) is the effective rank of the encoder features. All three take global arrays inside the
jitted step (XLA gathers what it needs; RankMe gathers no batch rows when N >= F) and return fp32
scalars.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax.losses import l2_normalize

NAMES = ("align", "uniform", "rankme")

# Garrido et al.'s epsilon: keeps p log p finite for singular values that are exactly zero.
_RANKME_EPS = 1e-7


def alignment(z1: jnp.ndarray, z2: jnp.ndarray, alpha: float = 2.0) -> jnp.ndarray:
    """Mean `||n(z1_i) - n(z2_i)||^alpha` over positive pairs (0: views map to the same point)."""
    d = l2_normalize(z1) - l2_normalize(z2)
    sq = jnp.sum(d * d, axis=-1)
    # sq ** (alpha / 2) without a NaN gradient at 0 for alpha < 2.
    return jnp.mean(jnp.where(sq > 0, jnp.where(sq > 0, sq, 1.0) ** (alpha / 2), 0.0))


def uniformity(z: jnp.ndarray, t: float = 2.0) -> jnp.ndarray:
    """`log mean_{i != j} exp(-t ||n(z_i) - n(z_j)||^2)`: 0 when collapsed, lower is more uniform.

    n orthonormal rows give exactly `-2t` (every pairwise squared distance is 2); the sphere's
    uniform distribution approaches about -4 at t=2 in high dimension. Costs O(n^2 d) flops and an
    [n, n] matrix for `z [n, d]` (one view's rows): the Gaussian kernel has no exact low-rank
    form, so the pairwise sum stays (it runs only on monitor steps).
    """
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 rows; got {z.shape}")
    z = l2_normalize(z)
    sim = jnp.dot(z, z.T, precision=jax.lax.Precision.HIGHEST)
    # ||a - b||^2 = 2 - 2 a.b on the sphere; clipped at 0 against rounding.
    sq = jnp.maximum(2.0 - 2.0 * sim, 0.0)
    off_diagonal = ~jnp.eye(n, dtype=bool)
    lse = jax.nn.logsumexp(jnp.where(off_diagonal, -t * sq, -jnp.inf))
    return lse - math.log(n * (n - 1))


def singular_values(features: jnp.ndarray) -> jnp.ndarray:
    """The min(N, F) singular values of `features [N, F]` in fp32, unordered, via a Gram matrix."""
    # Why not an SVD: at ImageNet scale features are [2B, F] = [8192, 2048], and an SVD gathers
    # all of them onto every device and runs a serial factorisation of the whole matrix each
    # monitor step. Here the batch only enters matmuls, which XLA runs on the row-sharded array as
    # local products plus an all-reduce (of the F x F Gram, then of F column norms); the one
    # factorisation is an eigh of the F x F Gram (N x N when N < F: same nonzero singular
    # values, and exactly min(N, F) of them, as Garrido et al.'s epsilon below needs).
    #
    # Why column norms rather than sqrt(eigvalsh(Gram)): fp32 eigenvalues of X^T X carry absolute
    # errors ~eps * s_max^2, so the sqrt turns exact zeros into ~sqrt(eps) * s_max = 3e-4 * s_max
    # (the Gram squares the condition number): a rank-1 [8192, 2048] batch read as rankme 1.48
    # where the SVD gives 1.003. The norms ||X v_i|| for the Gram's eigenvectors v_i are computed
    # from X itself: about eps * ||X||_F on null directions, as the SVD's are. They cost one more
    # sharded matmul and no more eigh work: JAX's eigvalsh computes the eigenvectors anyway.
    x = features.astype(jnp.float32)
    n, f = x.shape
    hi = jax.lax.Precision.HIGHEST  # fp32 products on GPU/TPU too (not TF32 / bf16 passes)
    if n >= f:
        _, v = jnp.linalg.eigh(jnp.dot(x.T, x, precision=hi))  # right singular vectors [F, F]
        y = jnp.dot(x, v, precision=hi)  # [N, F]: column i is s_i u_i
        sq = jnp.sum(y * y, axis=0)
    else:
        _, u = jnp.linalg.eigh(jnp.dot(x, x.T, precision=hi))  # left singular vectors [N, N]
        y = jnp.dot(u.T, x, precision=hi)  # [N, F]: row i is s_i v_i^T
        sq = jnp.sum(y * y, axis=1)
    return jnp.sqrt(sq)  # sums of squares: never negative, nothing to clip


def rankme(features: jnp.ndarray) -> jnp.ndarray:
    """Effective rank `exp(entropy(s / ||s||_1))` of `features [N, F]`'s singular values s.

    Between 1 (all rows on one line: collapse) and min(N, F) (all singular values equal). Costs
    two O(N F min(N, F)) matmuls and a min(N, F)-square eigh; see `singular_values`.
    """
    s = singular_values(features)
    p = s / jnp.maximum(jnp.sum(s), 1e-30) + _RANKME_EPS
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def representation_metrics(
    z1: jnp.ndarray, z2: jnp.ndarray, features: jnp.ndarray
) -> dict[str, jnp.ndarray]:
    """`{'align', 'uniform', 'rankme'}` of two views' projections and the encoder features.

    Uniformity is the mean over the two views, each on its own (Wang & Isola's recipe: the
    positives of the other view would otherwise count as close negatives).
    """
    z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    return {
        "align": alignment(z1, z2),
        "uniform": 0.5 * (uniformity(z1) + uniformity(z2)),
        "rankme": rankme(jax.lax.stop_gradient(features)),
    }


def maybe_representation_metrics(
    due: jnp.ndarray, z1: jnp.ndarray, z2: jnp.ndarray, features: jnp.ndarray
) -> dict[str, jnp.ndarray]:
    """`representation_metrics` when the traced bool `due` holds, zeros otherwise.

    A `lax.cond` runs only the taken branch, so the Gram eigh and the pairwise matrix cost nothing
    on other steps, and the step compiles once whatever the cadence.
    """
    return jax.lax.cond(
        due,
        representation_metrics,
        lambda *_: {name: jnp.zeros((), jnp.float32) for name in NAMES},
        z1,
        z2,
        features,
    )


def cadence(config: Any) -> int:
    """Steps between monitor computations: `monitor_every_steps`, or `log_every_steps` when 0."""
    return int(config.monitor_every_steps or config.log_every_steps)


def is_due(step: Any, every: int, total_steps: int) -> Any:
    """True on multiples of `every` and on the last step; works on ints and traced arrays."""
    return (step % every == 0) | (step == total_steps)


def format_monitors(step: int, values: dict[str, float]) -> str:
    """One line for the end-of-run summary."""
    return (
        f"representation monitors at step {step}: align={values['align']:.4f} "
        f"(0 = views agree)  uniform={values['uniform']:.4f} (0 = collapsed)  "
        f"rankme={values['rankme']:.1f} (1 = collapsed)"
    )
