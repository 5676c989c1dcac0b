"""Blockwise NT-Xent: equals the dense loss, metrics and gradients; memory O(local x chunk)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tolerances import fp32_rtol

from simclr_jax import losses
from simclr_jax.losses_blockwise import nt_xent_blockwise, nt_xent_blockwise_with_metrics

N, D, T = 16, 8, 0.1  # 2N = 32 candidate columns


def _tol(temperature):
    """Blockwise and dense sum the 2N logits s/t (|s| <= 1) in other orders, forward and backward.

    The loss and entropy (log-sum-exp minus a logit) carry an absolute error relative to the
    logits' size 1/t, and the softmax, so every gradient, the same as a relative error
    (tests/tolerances.py): eps x sqrt(2N) x 2 reductions / t, = 1.3e-5 at t = 0.1.
    """
    tol = fp32_rtol(2 * N, 2) / temperature
    return {"rtol": tol, "atol": tol}


TOL = _tol(T)


def _pair(seed=0, n=N, d=D):
    k1, k2 = jax.random.split(jax.random.key(seed))
    z1 = jax.random.normal(k1, (n, d))
    # Correlated views, so the positives are often but not always the argmax.
    return z1, z1 + 0.7 * jax.random.normal(k2, (n, d))


def _value_and_grads(fn, z1, z2, temperature):
    """Loss, metrics and gradients with respect to z1, z2 and the temperature."""

    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))
    (value, metrics), grads = grad_fn(z1, z2, jnp.float32(temperature))
    return value, metrics, grads


def _assert_same(dense, blockwise, temperature=T):
    (v1, m1, g1), (v2, m2, g2) = dense, blockwise
    tol = _tol(temperature)
    np.testing.assert_allclose(v2, v1, **tol)
    assert set(m1) == set(m2)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], err_msg=key, **tol)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(b, a, **tol)


# 2N = 32: chunks that divide it (1, 8, 32), that do not (5, 7, 12: a padded, masked last
# chunk), and one larger than the whole batch.
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 8, 12, 32, 100])
@pytest.mark.parametrize("decoupled", [False, True])
def test_unsharded_equals_dense(chunk_size, decoupled):
    z1, z2 = _pair()
    dense = _value_and_grads(
        functools.partial(losses.nt_xent_with_metrics, decoupled=decoupled), z1, z2, T
    )
    block = _value_and_grads(
        functools.partial(
            nt_xent_blockwise_with_metrics, chunk_size=chunk_size, decoupled=decoupled
        ),
        z1,
        z2,
        T,
    )
    _assert_same(dense, block)


def test_scalar_form_and_jit():
    z1, z2 = _pair(1)
    fn = jax.jit(functools.partial(nt_xent_blockwise, temperature=0.2, chunk_size=6))
    np.testing.assert_allclose(fn(z1, z2), losses.nt_xent(z1, z2, 0.2), **TOL)


def test_extreme_logits_stay_finite():
    # A low temperature makes logits span ~400: a naive exp overflows; the running max must not.
    z1, z2 = _pair(2)
    dense = _value_and_grads(losses.nt_xent_with_metrics, z1, z2, 0.005)
    block = _value_and_grads(
        functools.partial(nt_xent_blockwise_with_metrics, chunk_size=3), z1, z2, 0.005
    )
    assert np.isfinite(block[0])
    _assert_same(dense, block, temperature=0.005)


def _sharded(fn, mesh):
    return jax.shard_map(
        functools.partial(fn, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P()),
        out_specs=(P(), P()),
    )


@pytest.mark.parametrize("chunk_size,decoupled", [(4, False), (7, True), (32, False)])
def test_sharded_on_eight_devices_equals_unsharded_dense(chunk_size, decoupled):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 CPU devices"
    mesh = Mesh(np.asarray(devices), ("data",))
    # Different rows on every device: a gather whose backward dropped other devices'
    # contributions would still pass with identical shards (see DESIGN.md).
    z1, z2 = _pair(3)
    dense_fn = functools.partial(losses.nt_xent_with_metrics, decoupled=decoupled)
    block_fn = functools.partial(
        nt_xent_blockwise_with_metrics, chunk_size=chunk_size, decoupled=decoupled
    )
    dense = _value_and_grads(dense_fn, z1, z2, T)
    sharded = _value_and_grads(_sharded(block_fn, mesh), z1, z2, T)
    _assert_same(dense, sharded)
    # And the same as the sharded dense loss (the train step's other implementation).
    sharded_dense = _value_and_grads(_sharded(dense_fn, mesh), z1, z2, T)
    _assert_same(sharded_dense, sharded)


def test_invalid_chunk_size():
    z1, z2 = _pair()
    with pytest.raises(ValueError, match="chunk_size=0"):
        nt_xent_blockwise(z1, z2, T, chunk_size=0)


def _temp_bytes(fn, n, d):
    z = jax.ShapeDtypeStruct((n, d), jnp.float32)
    grad = jax.jit(jax.grad(lambda a, b: fn(a, b, 0.1)[0], argnums=(0, 1)))
    return grad.lower(z, z).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_local_rows_times_chunk():
    # 2N = 4096 views: the dense logits (and their softmax) are 64 MiB each; blockwise with
    # chunk 128 needs [4096, 128] blocks (2 MiB) and O(2N x D) residuals.
    n, d, chunk = 2048, 16, 128
    dense = _temp_bytes(losses.nt_xent_with_metrics, n, d)
    block = _temp_bytes(functools.partial(nt_xent_blockwise_with_metrics, chunk_size=chunk), n, d)
    assert dense >= (2 * n) ** 2 * 4, dense
    assert block <= 8 * (2 * n * chunk * 4) + 16 * (2 * n * d * 4), (block, dense)


def test_train_step_selects_blockwise_by_config():
    from simclr_jax.methods import simclr

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    z1, z2 = _pair(4)
    dense = jax.jit(simclr.sharded_nt_xent(mesh, T))(z1, z2)
    block = jax.jit(simclr.sharded_nt_xent(mesh, T, impl="blockwise", chunk_size=5))(z1, z2)
    np.testing.assert_allclose(block[0], dense[0], **TOL)
    for key in dense[1]:
        np.testing.assert_allclose(block[1][key], dense[1][key], err_msg=key, **TOL)
    with pytest.raises(ValueError, match="simclr.loss_impl='ring'"):
        simclr.sharded_nt_xent(mesh, T, impl="ring")
