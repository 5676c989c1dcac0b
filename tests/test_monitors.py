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


def svd_rankme(f: np.ndarray) -> float:
    """The fp32 SVD implementation that the Gram form replaced."""
    s = jnp.linalg.svd(jnp.asarray(f, jnp.float32), compute_uv=False)
    p = s / jnp.maximum(jnp.sum(s), 1e-30) + 1e-7
    return float(jnp.exp(-jnp.sum(p * jnp.log(p))))


_EPS32 = float(np.finfo(np.float32).eps)


def gram_rtol(f: np.ndarray, rank: int | None = None) -> float:
    """Relative error bound of fp32 `monitors.rankme(f)` for `f` of rank `rank` (default: full)."""
    s = np.linalg.svd(np.asarray(f, np.float64), compute_uv=False)
    rank = len(s) if rank is None else rank
    kappa = s[0] / s[rank - 1]
    # The real singular values: the fp32 eigh of the Gram is backward stable, so its eigenvalues
    # and the Ritz values ||X v_i||^2 are off by <= c eps s_max^2, i.e. s_i by <= c/2 eps kappa^2
    # relative (the Gram squares the condition number; kappa ~ 3 for these 4:1 Gaussian shapes).
    # p = s / sum(s) then moves by <= c eps kappa^2 relative, and H = -sum p log p (so
    # rankme = exp(H), relatively) by <= that times 1 + log(1 / p_min) <= 1 + log(rank kappa).
    # c = 8 covers the eigensolver's and the matmuls' constants.
    real = 8 * _EPS32 * kappa**2 * (1 + np.log(rank * kappa))
    # The min(N, F) - rank null directions: ||X v_i|| (like the SVD) comes out at <= c eps ||X||_F
    # <= c eps sum(s) (observed c < 1 at these sizes, 2 at [8192, 2048]; c = 4 here), so each p_i
    # lies in [1e-7, 1e-7 + 4 eps] above Garrido's epsilon, where -p log p has slope
    # <= 1 + log(1e7) < 17. A sqrt of fp32 Gram eigenvalues would put them at ~sqrt(eps) s_max
    # instead: 1e-2 and more off on these inputs.
    null = (len(s) - rank) * 17 * 4 * _EPS32
    return real + null


def _low_rank(n: int, d: int, rank: int, seed: int) -> np.ndarray:
    """Rows in a random `rank`-dimensional subspace: dimensional collapse."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))).astype(np.float32)


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


# 4:1 Gaussian shapes are well conditioned (kappa ~ (2 + 1) / (2 - 1) = 3); both N > F and N < F.
@pytest.mark.parametrize("n,d", [(64, 16), (16, 64), (256, 32), (32, 256)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rankme_equals_svd_on_random_features(n, d, seed):
    f = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    got, rtol = float(monitors.rankme(jnp.asarray(f))), gram_rtol(f)
    np.testing.assert_allclose(got, numpy_rankme(f), rtol=rtol)
    np.testing.assert_allclose(got, svd_rankme(f), rtol=rtol)


@pytest.mark.parametrize("n,d,rank", [(256, 64, 1), (256, 64, 4), (64, 256, 4), (512, 128, 8)])
def test_rankme_equals_svd_on_rank_deficient_features(n, d, rank):
    f = _low_rank(n, d, rank, seed=rank)
    got, rtol = float(monitors.rankme(jnp.asarray(f))), gram_rtol(f, rank)
    np.testing.assert_allclose(got, numpy_rankme(f), rtol=rtol)
    np.testing.assert_allclose(got, svd_rankme(f), rtol=rtol)
    assert got == pytest.approx(rank, rel=0.5)  # collapse shows: nowhere near min(n, d)


@pytest.mark.parametrize("n,d,rank", [(64, 16, None), (16, 64, None), (64, 16, 2)])
def test_rankme_of_row_sharded_features_equals_svd(n, d, rank):
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(3)
    f = rng.normal(size=(n, d)).astype(np.float32) if rank is None else _low_rank(n, d, rank, 3)
    sharded = jax.device_put(jnp.asarray(f), NamedSharding(mesh, P("data")))
    got, rtol = float(jax.jit(monitors.rankme)(sharded)), gram_rtol(f, rank)
    np.testing.assert_allclose(got, numpy_rankme(f), rtol=rtol)
    np.testing.assert_allclose(got, svd_rankme(f), rtol=rtol)


def test_rankme_of_row_sharded_features_does_not_gather_the_batch():
    # The point of the Gram form: with N >= F the batch enters only matmuls that XLA reduces
    # across devices (all-reduce of F x F and F values), instead of gathering all [N, F] rows.
    mesh = parallel.make_mesh()
    sharded = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("data")))
    hlo = jax.jit(monitors.rankme).lower(sharded).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo


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
