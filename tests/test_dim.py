"""Deep InfoMax: estimators against float64 numpy, sharded == unsharded, the method's step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import fp32_atol, fp32_rtol

from simclr_jax import losses_local, methods
from simclr_jax.config.checks import ConfigError


def numpy_dim(g: np.ndarray, loc: np.ndarray, estimator: str) -> float:
    """float64 DIM by loops: scores g_i . l_{j,m}; positives j == i, negatives j != i (all m')."""
    g, loc = np.asarray(g, np.float64), np.asarray(loc, np.float64)
    n, m, _ = loc.shape
    s = np.einsum("id,jmd->ijm", g, loc)
    softplus = lambda x: np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)  # noqa: E731
    total = 0.0
    for i in range(n):
        negs = np.concatenate([s[i, j] for j in range(n) if j != i])
        if estimator == "infonce":
            for k in range(m):
                logits = np.concatenate([[s[i, i, k]], negs])
                total += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - s[i, i, k]
        else:
            total += m * (np.mean(softplus(-s[i, i])) + np.mean(softplus(negs)))
    return total / (n * m)


def _inputs(n=16, m=4, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    g = jax.random.normal(k1, (n, d))
    loc = 0.5 * g[:, None, :] + jax.random.normal(k2, (n, m, d))  # positives score higher
    return g, loc


@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
def test_estimators_match_numpy(estimator):
    g, loc = _inputs()
    loss, metrics = losses_local.ESTIMATORS[estimator](g, loc)
    want = numpy_dim(np.asarray(g), np.asarray(loc), estimator)
    np.testing.assert_allclose(float(loss), want, rtol=fp32_rtol(16 * 4 * 8, 3))
    assert 0.0 < float(metrics["dim_acc"]) < 1.0


def test_infonce_analytic_value_at_zero_scores():
    """All scores 0: each positive competes with (N-1) M equal negatives, loss log(1 + (N-1) M)."""
    g = jnp.zeros((6, 4))
    loc = jnp.ones((6, 3, 4))
    loss, _ = losses_local.dim_infonce(g, loc)
    np.testing.assert_allclose(float(loss), np.log(1 + 5 * 3), rtol=1e-6)
    loss, _ = losses_local.dim_jsd(g, loc)
    np.testing.assert_allclose(float(loss), 2 * np.log(2.0), rtol=1e-6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="g must be"):
        losses_local.dim_infonce(jnp.zeros((4, 8)), jnp.zeros((4, 3, 7)))


@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
def test_sharded_equals_unsharded_with_grads(estimator):
    mesh = jax.make_mesh((8,), ("data",))
    g, loc = _inputs(n=32, m=4, d=8, seed=3)
    fn = losses_local.ESTIMATORS[estimator]

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"),) * 2, out_specs=(P(), P()))
    def sharded(a, b):
        return fn(a, b, axis_name="data")

    sg = jax.device_put(g, NamedSharding(mesh, P("data")))
    sl = jax.device_put(loc, NamedSharding(mesh, P("data")))
    loss_s, m_s = jax.jit(sharded)(sg, sl)
    loss_u, m_u = fn(g, loc)
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=fp32_rtol(32 * 4 * 8, 3))
    assert float(m_s["dim_acc"]) == pytest.approx(float(m_u["dim_acc"]))
    grads_s = jax.jit(jax.grad(lambda a, b: sharded(a, b)[0], argnums=(0, 1)))(sg, sl)
    grads_u = jax.grad(lambda a, b: fn(a, b)[0], argnums=(0, 1))(g, loc)
    for gs, gu in zip(grads_s, grads_u, strict=True):
        assert float(jnp.max(jnp.abs(gu))) > 1e-5
        np.testing.assert_allclose(gs, gu, atol=fp32_atol(gu, 32 * 4 * 8, 3))


def test_config_is_validated():
    c = tiny.tiny_config(method="dim")
    c.dim.estimator = "mine"
    with pytest.raises(ConfigError, match="dim.estimator='mine'"):
        methods.get("dim").validate(c)


@pytest.fixture(scope="module")
def dim_run():
    """Four DIM steps of the tiny network on 8 devices, compiled once for the module."""
    from test_methods import _hand_run

    c = tiny.tiny_config(method="dim", total_steps=4, log_every_steps=1, checkpoint_every_steps=2)
    c.dim.local_hidden_dim = 16
    c.eval.at_end = False
    return c, _hand_run(c, jax.devices(), c.total_steps)


def test_step_learns_and_reports_the_estimator_accuracy(dim_run):
    config, (states, metrics, _) = dim_run
    assert "local_head" in states[0].params
    local = states[0].params["local_head"]
    assert local["dense1"]["kernel"].shape == (16, 16)  # stage-3 channels: 4 x 2**2
    losses = [float(m["loss"]) for m in metrics]
    assert all(np.isfinite(losses)) and all(0 <= float(m["dim_acc"]) <= 1 for m in metrics)
    assert min(losses) > 0


def test_sharded_steps_equal_the_single_device_steps(dim_run):
    from test_methods import _hand_run, assert_steps_agree

    config, (states8, metrics8, _) = dim_run
    states1, metrics1, _ = _hand_run(config, jax.devices()[:1], 1)
    keys = ("loss", "dim_acc", "linear_loss", "grad_norm")
    assert_steps_agree((states1, metrics1), (states8, metrics8), keys)


def test_resume_is_bit_exact(dim_run, tmp_path):
    from simclr_jax import checkpoint, modes
    from simclr_jax.runtime import parallel

    config, (states, _, _) = dim_run
    workdir = str(tmp_path / "run")
    manager = checkpoint.create_manager(workdir)
    state2 = jax.device_put(states[2], parallel.replicated(parallel.make_mesh()))
    checkpoint.save(manager, 2, state2, {"step": 2, "data_step": 2})
    manager.wait_until_finished()
    manager.close()
    final = jax.device_get(modes.pretrain(config, workdir)["state"])
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(states[-1]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["dim_digits", "dim_cifar10", "dim_imagenet"])
def test_dim_configs_validate(name):
    from simclr_jax import config_base

    c = tiny.load_config(name)
    config_base.validate_config(c)
    assert c.method == "dim"
