"""NT-Xent: numpy reference, analytic bounds, and sharded == unsharded on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import fp32_atol

from simclr_jax import losses


def numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> tuple[float, float]:
    """Straightforward float64 SimCLR loss and contrastive accuracy over 2N anchors."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    total, correct = 0.0, 0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        lse = np.log(np.sum(np.exp(sim[i, others])))
        total += lse - sim[i, pos]
        correct += int(others[int(np.argmax(sim[i, others]))] == pos)
    return total / (2 * n), correct / (2 * n)


def _random_views(n: int = 16, d: int = 8, seed: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    z1 = jax.random.normal(k1, (n, d))
    z2 = z1 + 0.5 * jax.random.normal(k2, (n, d))
    return z1, z2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_numpy_reference(temperature):
    z1, z2 = _random_views()
    loss, metrics = losses.nt_xent_with_metrics(z1, z2, temperature)
    ref_loss, ref_acc = numpy_nt_xent(np.asarray(z1), np.asarray(z2), temperature)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["contrastive_acc"]), ref_acc, atol=1e-6)
    assert float(losses.nt_xent(z1, z2, temperature)) == pytest.approx(float(loss))


def test_perfect_alignment_with_orthogonal_negatives_reaches_analytic_minimum():
    n, t = 4, 0.1
    z = jnp.eye(8)[:n]  # each pair identical, all pairs mutually orthogonal
    loss, metrics = losses.nt_xent_with_metrics(z, z, t)
    # positive logit 1/t, 2N-2 negatives at 0:  log(e^{1/t} + 2N-2) - 1/t
    expected = np.log(np.exp(1 / t) + 2 * n - 2) - 1 / t
    # fp32 log-sum-exp of 2N - 1 logits of size 1/t = 10, after the similarity sums: the error is
    # relative to the logits, not to the small loss (tests/tolerances.py).
    np.testing.assert_allclose(float(loss), expected, atol=fp32_atol(1 / t, 2 * n, 2))
    assert float(loss) < 1e-3
    assert float(metrics["contrastive_acc"]) == 1.0


def test_uniform_embeddings_give_log_of_candidates():
    n = 6
    z = jnp.ones((n, 4))  # every similarity equal: loss = log(2N - 1), entropy the same
    loss, metrics = losses.nt_xent_with_metrics(z, z, 0.5)
    # log-sum-exp minus the positive logit, both of size up to 1/0.5 + log(2N - 1).
    tol = fp32_atol(1 / 0.5 + np.log(2 * n - 1), 2 * n, 2)
    np.testing.assert_allclose(float(loss), np.log(2 * n - 1), atol=tol)
    np.testing.assert_allclose(float(metrics["entropy"]), np.log(2 * n - 1), rtol=1e-5)


def test_temperature_scaling():
    z1, z2 = _random_views()
    values = [float(losses.nt_xent(z1, z2, t)) for t in (0.05, 0.2, 1.0, 10.0)]
    # Positives are the most similar pairs here, so a sharper softmax lowers the loss ...
    assert values == sorted(values)
    # ... and an infinite temperature approaches log(2N - 1).
    np.testing.assert_allclose(float(losses.nt_xent(z1, z2, 1e6)), np.log(31), rtol=1e-4)


def test_invariant_to_embedding_scale():
    z1, z2 = _random_views()
    np.testing.assert_allclose(
        float(losses.nt_xent(z1, z2, 0.2)), float(losses.nt_xent(3 * z1, 0.1 * z2, 0.2)), rtol=1e-5
    )


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(jnp.ones((2, 3)), jnp.ones((2, 3)), 0.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        losses.nt_xent(jnp.ones((2, 3)), jnp.ones((3, 3)), 0.1)


def _sharded_loss_fn(mesh, temperature):
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=(P(), P()),
    )
    def fn(z1, z2):
        loss, metrics = losses.nt_xent_with_metrics(z1, z2, temperature, axis_name="data")
        return loss, metrics["contrastive_acc"]

    return fn


def test_sharded_loss_and_grads_equal_unsharded():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    # Inputs differ from device to device, so a gather whose backward drops other devices'
    # contributions would fail here.
    z1, z2 = _random_views(n=32, d=16, seed=3)
    spec = NamedSharding(mesh, P("data"))
    sz1, sz2 = jax.device_put(z1, spec), jax.device_put(z2, spec)
    sharded = _sharded_loss_fn(mesh, 0.2)

    loss_s, acc_s = jax.jit(sharded)(sz1, sz2)
    loss_u, metrics_u = losses.nt_xent_with_metrics(z1, z2, 0.2)
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=1e-5)
    np.testing.assert_allclose(float(acc_s), float(metrics_u["contrastive_acc"]), atol=1e-6)

    grad_s = jax.jit(jax.grad(lambda a, b: sharded(a, b)[0], argnums=(0, 1)))(sz1, sz2)
    grad_u = jax.grad(lambda a, b: losses.nt_xent(a, b, 0.2), argnums=(0, 1))(z1, z2)
    for gs, gu in zip(grad_s, grad_u, strict=True):
        assert float(jnp.max(jnp.abs(gu))) > 1e-4  # real gradients, not zeros
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gu), atol=1e-5, rtol=1e-5)


def test_sharded_logits_are_local_by_global():
    mesh = jax.make_mesh((8,), ("data",))
    z1, z2 = _random_views(n=16, d=4)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")
    )
    def local_logits(a, b):
        logits, _ = losses.nt_xent_logits(a, b, 0.5, axis_name="data")
        return logits

    spec = NamedSharding(mesh, P("data"))
    out = jax.jit(local_logits)(jax.device_put(z1, spec), jax.device_put(z2, spec))
    # Each device holds its 2n = 4 anchors against all 2N = 32 candidates.
    assert out.shape == (8 * 4, 32)
    assert out.addressable_shards[0].data.shape == (4, 32)
