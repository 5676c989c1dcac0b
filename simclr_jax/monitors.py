"""Label-free representation monitors that warn of collapse: alignment, uniformity, RankMe.

Alignment and uniformity are Wang & Isola (2020) on L2-normalised embeddings; RankMe (Garrido et
al. 2023) is the effective rank of the encoder features. All three take global arrays inside the
jitted step (XLA gathers what it needs) and return fp32 scalars.
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
    uniform distribution approaches about -4 at t=2 in high dimension.
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


def rankme(features: jnp.ndarray) -> jnp.ndarray:
    """Effective rank `exp(entropy(s / ||s||_1))` of `features [N, F]`'s singular values s.

    Between 1 (all rows on one line: collapse) and min(N, F) (all singular values equal).
    """
    s = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)
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

    A `lax.cond` runs only the taken branch, so the SVD and the pairwise matrix cost nothing on
    other steps, and the step compiles once whatever the cadence.
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
