"""Loss options beside NT-Xent: numpy references, and sharded == unsharded on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import fp32_atol

from simclr_jax import losses


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_decoupled_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """float64 DCL: for each of the 2N anchors, log sum over the 2N-2 negatives - positive."""
    z = _normalize(np.concatenate([z1, z2]))
    n = z1.shape[0]
    sim = z @ z.T / temperature
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        negatives = [j for j in range(2 * n) if j not in (i, pos)]
        total += np.log(np.sum(np.exp(sim[i, negatives]))) - sim[i, pos]
    return total / (2 * n)


def numpy_info_nce(q, k, queue, temperature) -> tuple[float, float]:
    """float64 MoCo InfoNCE: cross-entropy with the positive in column 0, and accuracy."""
    q, k, queue = _normalize(q), _normalize(k), _normalize(queue)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1) / temperature
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    return float(np.mean(lse - logits[:, 0])), float(np.mean(np.argmax(logits, 1) == 0))


def numpy_margin_contrastive(z1, z2, same, margin) -> float:
    d = np.linalg.norm(np.asarray(z1, np.float64) - np.asarray(z2, np.float64), axis=1)
    loss = np.where(same, 0.5 * d**2, 0.5 * np.maximum(0.0, margin - d) ** 2)
    return float(loss.mean())


def numpy_triplet(a, p, n, margin, squared) -> float:
    a, p, n = (np.asarray(x, np.float64) for x in (a, p, n))
    dp, dn = np.sum((a - p) ** 2, 1), np.sum((a - n) ** 2, 1)
    if not squared:
        dp, dn = np.sqrt(dp), np.sqrt(dn)
    return float(np.mean(np.maximum(0.0, dp - dn + margin)))


def _normal(seed: int, *shape: int) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), shape)


def _views(n: int = 16, d: int = 8, seed: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    z1 = _normal(seed, n, d)
    return z1, z1 + 0.5 * _normal(seed + 100, n, d)


def _mesh():
    assert jax.device_count() == 8
    return jax.make_mesh((8,), ("data",))


def _put(mesh, *arrays, spec=None):
    spec = P("data") if spec is None else spec
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def _triplets(n: int, d: int, seed: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Anchors, positives, and negatives at spread-out distances: some triplets active, some not."""
    a = _normal(seed, n, d)
    p = a + 0.3 * _normal(seed + 1, n, d)
    scale = jnp.linspace(0.5, 2.0, n)[:, None]
    return a, p, a + 0.3 * scale * _normal(seed + 2, n, d)


# ---- decoupled NT-Xent ----


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_decoupled_nt_xent_matches_numpy(temperature):
    z1, z2 = _views()
    loss, metrics = losses.nt_xent_with_metrics(z1, z2, temperature, decoupled=True)
    ref = numpy_decoupled_nt_xent(np.asarray(z1), np.asarray(z2), temperature)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-5)
    assert float(losses.nt_xent(z1, z2, temperature, decoupled=True)) == pytest.approx(float(loss))
    # The metrics keep their meaning: the full-softmax accuracy of the plain loss.
    plain = losses.nt_xent_with_metrics(z1, z2, temperature)[1]
    assert float(metrics["contrastive_acc"]) == float(plain["contrastive_acc"])


def test_decoupled_is_plain_minus_log_one_minus_positive_probability():
    # NT-Xent = -log p_pos; DCL = log(sum_neg) - s_pos = NT-Xent + log(1 - p_pos) per anchor.
    z1, z2 = _views(n=8)
    t = 0.3
    logits, pos_col = losses.nt_xent_logits(z1, z2, t)
    p_pos = jnp.take_along_axis(jax.nn.softmax(logits, -1), pos_col[:, None], -1)[:, 0]
    plain = -jnp.log(p_pos)
    expected = jnp.mean(plain + jnp.log1p(-p_pos))
    np.testing.assert_allclose(
        float(losses.nt_xent(z1, z2, t, decoupled=True)), float(expected), rtol=1e-5
    )


def test_decoupled_logits_mask_the_positive():
    z1, z2 = _views(n=4)
    logits, pos_col = losses.nt_xent_logits(z1, z2, 0.5, decoupled=True)
    masked = np.asarray(jnp.take_along_axis(logits, pos_col[:, None], -1))
    assert np.all(masked < -1e8)
    plain, _ = losses.nt_xent_logits(z1, z2, 0.5)
    assert int(jnp.sum(logits != plain)) == 8  # only the 2N positive entries differ


def test_decoupled_sharded_loss_and_grads_equal_unsharded():
    mesh = _mesh()
    z1, z2 = _views(n=32, d=16, seed=3)  # rows differ from device to device

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def sharded(a, b):
        return losses.nt_xent(a, b, 0.2, axis_name="data", decoupled=True)

    sz1, sz2 = _put(mesh, z1, z2)
    np.testing.assert_allclose(
        float(jax.jit(sharded)(sz1, sz2)),
        float(losses.nt_xent(z1, z2, 0.2, decoupled=True)),
        rtol=1e-5,
    )
    grad_s = jax.jit(jax.grad(sharded, argnums=(0, 1)))(sz1, sz2)
    grad_u = jax.grad(lambda a, b: losses.nt_xent(a, b, 0.2, decoupled=True), argnums=(0, 1))(
        z1, z2
    )
    for gs, gu in zip(grad_s, grad_u, strict=True):
        assert float(jnp.max(jnp.abs(gu))) > 1e-4
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gu), atol=1e-5, rtol=1e-5)


# ---- InfoNCE with explicit negatives ----


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_numpy(temperature):
    q, k = _views(n=12, d=8, seed=1)
    queue = _normal(2, 40, 8)
    loss, acc = losses.info_nce(q, k, queue, temperature)
    ref_loss, ref_acc = numpy_info_nce(np.asarray(q), np.asarray(k), np.asarray(queue), temperature)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(acc), ref_acc, atol=1e-6)


def test_info_nce_analytic_values():
    d, n, big_k, t = 16, 4, 8, 0.2
    eye = jnp.eye(d)
    q = eye[:n]
    # Keys equal to the queries, queue orthogonal to them: log(e^{1/t} + K) - 1/t.
    loss, acc = losses.info_nce(q, q, eye[n : n + big_k], t)
    # The error is relative to the logits (1/t), not to the small loss (tests/tolerances.py).
    want = np.log(np.exp(1 / t) + big_k) - 1 / t
    np.testing.assert_allclose(float(loss), want, atol=fp32_atol(1 / t, big_k + 1, 2))
    assert float(acc) == 1.0
    # All logits equal: loss log(K + 1).
    ones = jnp.ones((n, d))
    np.testing.assert_allclose(
        float(losses.info_nce(ones, ones, jnp.ones((big_k, d)), t)[0]), np.log(big_k + 1), rtol=1e-6
    )


def test_info_nce_bad_shapes():
    with pytest.raises(ValueError, match="queue"):
        losses.info_nce(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.ones((8, 3)), 0.2)
    with pytest.raises(ValueError, match="q and k"):
        losses.info_nce(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((8, 4)), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        losses.info_nce(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.ones((8, 4)), 0.0)


def test_info_nce_sharded_equals_unsharded_with_grads():
    mesh = _mesh()
    q, k = _views(n=32, d=16, seed=5)
    queue = _normal(6, 64, 16)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P(), P())
    )
    def sharded(a, b, c):
        return losses.info_nce(a, b, c, 0.2, axis_name="data")

    sq, sk = _put(mesh, q, k)
    (squeue,) = _put(mesh, queue, spec=P())
    loss_s, acc_s = jax.jit(sharded)(sq, sk, squeue)
    loss_u, acc_u = losses.info_nce(q, k, queue, 0.2)
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=1e-5)
    assert float(acc_s) == pytest.approx(float(acc_u))
    grad_s = jax.jit(jax.grad(lambda *a: sharded(*a)[0], argnums=(0, 1, 2)))(sq, sk, squeue)
    grad_u = jax.grad(lambda *a: losses.info_nce(*a, 0.2)[0], argnums=(0, 1, 2))(q, k, queue)
    for gs, gu in zip(grad_s, grad_u, strict=True):
        assert float(jnp.max(jnp.abs(gu))) > 1e-5
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gu), atol=1e-5, rtol=1e-5)


# ---- margin contrastive and triplet ----


@pytest.mark.parametrize("margin", [0.5, 2.0, 5.0])
def test_margin_contrastive_matches_numpy(margin):
    z1, z2 = _views(n=16, d=8, seed=7)
    same = jnp.arange(16) % 3 == 0
    loss = losses.margin_contrastive(z1, z2, same, margin)
    ref = numpy_margin_contrastive(np.asarray(z1), np.asarray(z2), np.asarray(same), margin)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    # {0, 1} labels mean the same as booleans.
    np.testing.assert_allclose(
        float(losses.margin_contrastive(z1, z2, same.astype(jnp.int32), margin)), ref, rtol=1e-5
    )


def test_margin_contrastive_gradient_is_finite_at_zero_distance():
    z = _normal(8, 4, 3)
    grads = jax.grad(lambda a: losses.margin_contrastive(a, z, jnp.zeros(4, bool), 1.0))(z)
    assert np.all(np.isfinite(np.asarray(grads)))
    # Identical dissimilar pairs pay margin^2 / 2 each.
    np.testing.assert_allclose(
        float(losses.margin_contrastive(z, z, jnp.zeros(4, bool), 1.0)), 0.5, rtol=1e-6
    )


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_matches_numpy(squared, margin):
    a, p, n = _triplets(16, 8, seed=9)
    loss = losses.triplet(a, p, n, margin, squared=squared)
    ref = numpy_triplet(np.asarray(a), np.asarray(p), np.asarray(n), margin, squared)
    # Both branches of the hinge are exercised: some triplets pay, some are already satisfied.
    per = np.asarray(
        jax.vmap(lambda *x: losses.triplet(*x, margin, squared=squared))(
            a[:, None], p[:, None], n[:, None]
        )
    )
    assert 0 < np.sum(per > 0) < len(per)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_triplet_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        losses.triplet(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((3, 3)), 0.1)


def test_pair_losses_sharded_equal_unsharded_with_grads():
    mesh = _mesh()
    z1, z2, z3 = _triplets(32, 8, seed=12)
    same = jnp.arange(32) % 2 == 0

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P())
    def sharded(a, b, c, s):
        return losses.margin_contrastive(a, b, s, 3.0, axis_name="data") + losses.triplet(
            a, b, c, 1.0, axis_name="data", squared=False
        )

    def unsharded(a, b, c, s):
        return losses.margin_contrastive(a, b, s, 3.0) + losses.triplet(a, b, c, 1.0, squared=False)

    args = _put(mesh, z1, z2, z3, same)
    np.testing.assert_allclose(
        float(jax.jit(sharded)(*args)), float(unsharded(z1, z2, z3, same)), rtol=1e-5
    )
    grad_s = jax.jit(jax.grad(sharded, argnums=(0, 1, 2)))(*args)
    grad_u = jax.grad(unsharded, argnums=(0, 1, 2))(z1, z2, z3, same)
    for gs, gu in zip(grad_s, grad_u, strict=True):
        assert float(jnp.max(jnp.abs(gu))) > 1e-4
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gu), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decoupled", [False, True])
def test_train_sharded_loss_honours_the_decoupled_switch(decoupled):
    from simclr_jax.methods import simclr
    from simclr_jax.runtime import parallel

    mesh = parallel.make_mesh()
    z1, z2 = _views(n=32, d=16, seed=21)
    loss, metrics = jax.jit(simclr.sharded_nt_xent(mesh, 0.3, decoupled=decoupled))(
        *_put(mesh, z1, z2)
    )
    want = losses.nt_xent_with_metrics(z1, z2, 0.3, decoupled=decoupled)[0]
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
