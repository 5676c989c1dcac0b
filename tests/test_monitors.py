"""Representation monitors: analytic values on constructed inputs, numpy references, cadence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax import monitors
from simclr_jax.runtime import parallel


def _orthonormal(n: int, d: int, seed: int = 0) -> jnp.ndarray:
    """n orthonormal rows in d dimensions, randomly rotated (not just the identity)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return jnp.asarray(q[:n], jnp.float32)


def numpy_uniformity(z: np.ndarray, t: float) -> float:
    z = np.asarray(z, np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    vals = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(n) for j in range(n) if i != j]
    return float(np.log(np.mean(vals)))


def numpy_rankme(f: np.ndarray) -> float:
    s = np.linalg.svd(np.asarray(f, np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-np.sum(p * np.log(p))))


def test_collapsed_embeddings_have_uniformity_zero_and_rank_one():
    z = jnp.tile(jnp.array([[0.3, -1.2, 0.5, 2.0]]), (16, 1))
    assert abs(float(monitors.uniformity(z))) < 1e-6
    # Collapse up to scale is still collapse: rows on one line have one singular value.
    features = jnp.linspace(0.5, 2.0, 16)[:, None] * z
    np.testing.assert_allclose(float(monitors.rankme(features)), 1.0, atol=1e-4)
    assert float(monitors.alignment(z, 2.0 * z)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0])
def test_orthonormal_embeddings_give_analytic_uniformity(t):
    # Every pairwise squared distance is 2, so the mean Gaussian potential is exp(-2t).
    z = _orthonormal(8, 16)
    np.testing.assert_allclose(float(monitors.uniformity(z, t)), -2.0 * t, atol=1e-5)


@pytest.mark.parametrize("n,d", [(8, 8), (8, 32), (32, 8)])
def test_orthogonal_features_have_full_effective_rank(n, d):
    # Equal singular values: the normalised spectrum is uniform over min(n, d) values.
    f = jnp.eye(max(n, d))[:n, :d] * 3.0
    np.testing.assert_allclose(float(monitors.rankme(f)), min(n, d), rtol=1e-4)
    np.testing.assert_allclose(float(monitors.rankme(_orthonormal(8, 16))), 8.0, rtol=1e-4)


def test_rankme_of_two_unequal_singular_values():
    # s = (3, 1): p = (3/4, 1/4), effective rank exp(H(p)).
    p = np.array([0.75, 0.25])
    expected = np.exp(-np.sum(p * np.log(p)))
    np.testing.assert_allclose(
        float(monitors.rankme(jnp.diag(jnp.array([3.0, 1.0])))), expected, rtol=1e-5
    )


def test_alignment_values():
    z = _orthonormal(8, 16)
    assert float(monitors.alignment(z, z)) == 0.0
    # Orthogonal partners: squared distance 2 per pair.
    z1, z2 = z[:4], z[4:]
    np.testing.assert_allclose(float(monitors.alignment(z1, z2)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(monitors.alignment(z1, z2, alpha=1)), np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(float(monitors.alignment(z1, -z1)), 4.0, rtol=1e-6)
    grad = jax.grad(lambda a: monitors.alignment(a, z, alpha=1))(z)
    assert np.all(np.isfinite(np.asarray(grad)))  # no NaN at zero distance


def test_random_inputs_match_numpy():
    k1, k2 = jax.random.split(jax.random.key(0))
    z = jax.random.normal(k1, (24, 6))
    f = jax.random.normal(k2, (40, 12))
    np.testing.assert_allclose(
        float(monitors.uniformity(z, 2.0)), numpy_uniformity(np.asarray(z), 2.0), rtol=1e-5
    )
    np.testing.assert_allclose(float(monitors.rankme(f)), numpy_rankme(np.asarray(f)), rtol=1e-4)


def test_global_arrays_on_eight_devices_equal_one_device():
    mesh = parallel.make_mesh()  # the train step's mesh (auto sharding: XLA gathers)
    assert mesh.devices.size == 8
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    z1, z2, f = (jax.random.normal(k, (32, 8)) for k in (k1, k2, k3))
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (z1, z2, f)]
    got = jax.jit(monitors.representation_metrics)(*sharded)
    want = monitors.representation_metrics(z1, z2, f)
    for name in monitors.NAMES:
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5, err_msg=name)


def test_maybe_metrics_computes_only_when_due_without_recompiling():
    z1 = _orthonormal(8, 16)
    fn = jax.jit(monitors.maybe_representation_metrics)
    off = fn(jnp.array(False), z1, z1, z1)
    on = fn(jnp.array(True), z1, z1, z1)
    assert fn._cache_size() == 1
    assert all(float(off[k]) == 0.0 for k in monitors.NAMES)
    np.testing.assert_allclose(float(on["uniform"]), -4.0, atol=1e-5)
    np.testing.assert_allclose(float(on["rankme"]), 8.0, rtol=1e-4)
    assert float(on["align"]) == pytest.approx(0.0, abs=1e-7)


def test_cadence_and_due_steps():
    class C:
        monitor_every_steps = 0
        log_every_steps = 20

    assert monitors.cadence(C) == 20
    C.monitor_every_steps = 7
    assert monitors.cadence(C) == 7
    due = [s for s in range(1, 31) if monitors.is_due(s, 7, 30)]
    assert due == [7, 14, 21, 28, 30]
    traced = jax.jit(lambda s: monitors.is_due(s, 7, 30))
    assert [bool(traced(s)) for s in (7, 8, 30)] == [True, False, True]


def test_uniformity_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        monitors.uniformity(jnp.ones((1, 4)))
