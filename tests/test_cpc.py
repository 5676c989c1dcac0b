"""CPC: the patch grid and causal mask by hand, the loss against numpy, sharded == unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import fp32_atol, fp32_rtol

from simclr_jax import losses_local, methods, models
from simclr_jax.config.checks import ConfigError
from simclr_jax.methods import cpc
from simclr_jax.models import patch_grid


def test_patches_are_the_windows_at_the_strides():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
    p = patch_grid.extract_patches(x, 4, 2)  # (6 - 4) // 2 + 1 = 2 patches per side
    assert p.shape == (2, 2, 2, 4, 4, 1)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(p[:, i, j], x[:, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4])
    with pytest.raises(ValueError, match="does not fit 6 px"):
        patch_grid.grid_size(6, 8, 2)


def test_direction_targets_by_hand():
    """3x3 grid, indices 0..8 row-major; one row ahead in each direction of a quarter turn."""
    np.testing.assert_array_equal(patch_grid.direction_targets(3, 0, 1), [3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(patch_grid.direction_targets(3, 0, 2), [6, 7, 8])
    # rot90 once (counter-clockwise): rotated rows are the columns from the right: [2,5,8],
    # [1,4,7], [0,3,6]; one row ahead of the first two rotated rows.
    np.testing.assert_array_equal(patch_grid.direction_targets(3, 1, 1), [1, 4, 7, 0, 3, 6])
    np.testing.assert_array_equal(patch_grid.direction_targets(3, 2, 1), [5, 4, 3, 2, 1, 0])


def test_context_at_row_i_never_sees_the_rows_below():
    net = patch_grid.ContextNetwork(width=8, layers=3)
    z = jax.random.normal(jax.random.key(0), (1, 5, 5, 4))
    params = net.init(jax.random.key(1), z)
    for row in range(5):
        jac = jax.jacobian(lambda z, r=row: net.apply(params, z)[0, r].sum())(z)  # [1, 5, 5, 4]
        seen = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3))
        assert np.all(seen[row + 1 :] == 0), f"row {row} sees rows below: {seen}"
        # Each masked 3x3 reaches one row up: 3 layers see the 3 rows above.
        assert np.all(seen[max(row - 3, 0) : row + 1] > 0), f"row {row} misses rows: {seen}"


def numpy_cpc(pred, z, targets):
    pred, z = np.asarray(pred, np.float64), np.asarray(z, np.float64)
    n, p, _ = pred.shape
    q = z.shape[1]
    flat = z.reshape(n * q, -1)
    total = 0.0
    for i in range(n):
        for k in range(p):
            logits = flat @ pred[i, k]
            m = logits.max()
            total += np.log(np.sum(np.exp(logits - m))) + m - logits[i * q + targets[k]]
    return total / (n * p)


def _inputs(n=16, p=6, q=9, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    z = jax.random.normal(k1, (n, q, d))
    targets = np.arange(p) % q
    pred = 0.5 * z[:, targets] + jax.random.normal(k2, (n, p, d))
    return pred, z, targets


def test_cpc_infonce_matches_numpy():
    pred, z, targets = _inputs()
    loss, metrics = losses_local.cpc_infonce(pred, z, targets)
    want = numpy_cpc(pred, z, targets)
    np.testing.assert_allclose(float(loss), want, rtol=fp32_rtol(16 * 9 * 8, 3))
    assert 0 < float(metrics["cpc_acc"]) < 1


def test_cpc_infonce_sharded_equals_unsharded_with_grads():
    mesh = jax.make_mesh((8,), ("data",))
    pred, z, targets = _inputs(n=32, seed=2)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"),) * 2, out_specs=(P(), P()))
    def sharded(a, b):
        return losses_local.cpc_infonce(a, b, targets, axis_name="data")

    sp, sz = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (pred, z))
    loss_s, m_s = jax.jit(sharded)(sp, sz)
    loss_u, m_u = losses_local.cpc_infonce(pred, z, targets)
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=fp32_rtol(32 * 9 * 8, 3))
    assert float(m_s["cpc_acc"]) == pytest.approx(float(m_u["cpc_acc"]))
    grads_s = jax.jit(jax.grad(lambda a, b: sharded(a, b)[0], argnums=(0, 1)))(sp, sz)
    grads_u = jax.grad(lambda a, b: losses_local.cpc_infonce(a, b, targets)[0], argnums=(0, 1))(
        pred, z
    )
    for gs, gu in zip(grads_s, grads_u, strict=True):
        assert float(jnp.max(jnp.abs(gu))) > 1e-5
        np.testing.assert_allclose(gs, gu, atol=fp32_atol(gu, 32 * 9 * 8, 3))


def _config(**overrides):
    c = tiny.tiny_config(method="cpc", total_steps=2, log_every_steps=1, **overrides)
    c.model.patch_grid, c.model.patch_grid_stride = 4, 2  # 8 px images: a 3x3 grid
    c.cpc.steps, c.cpc.context_dim, c.cpc.context_layers = 2, 8, 1
    c.cpc.directions = 1  # the four directions' code is the same, compiled four times
    c.eval.at_end = False
    return c


def test_config_is_validated():
    c = _config()
    c.cpc.steps = 3
    with pytest.raises(ConfigError, match=r"cpc.steps=3 .*\[1, 2\] for a 3x3 patch grid"):
        methods.get("cpc").validate(c)
    c.cpc.steps, c.model.patch_grid = 2, 0
    with pytest.raises(ConfigError, match="model.patch_grid=0"):
        methods.get("cpc").validate(c)


def test_sharded_step_equals_one_device_and_the_export_pools_patches(tmp_path):
    """The first CPC step on 8 devices equals it on one; the export's encoder is the patch grid,
    so evaluation pools patch features as training did.

    Colour jitter is off here: with it, the per-patch views differ between the two programs by
    1 ulp in a few pixels (checked below), and the step's gradient is not continuous there
    (exact ties at ReLU's kink): on one device alone, +-1e-7 on the inputs moves the encoder's
    gradient by the same 3-7% as going to 8 devices does (measured 2026-12-05). Without jitter
    the two steps agree to float32 rounding.
    """
    import ml_collections
    from test_methods import _hand_run, assert_steps_agree

    from simclr_jax import checkpoint, data
    from simclr_jax.pretrain import train
    from simclr_jax.runtime import parallel

    config = _config()
    batch = next(data.pretrain_iterator(config))
    patches = jax.jit(lambda k, x, crop: cpc.patches_of(k, x, config, crop))
    views = []
    for devices in (jax.devices()[:1], jax.devices()):
        placed = parallel.host_to_global(batch, parallel.make_mesh(devices))
        views.append(np.asarray(patches(jax.random.key(0), placed["image"], placed.get("crop"))))
    np.testing.assert_allclose(views[1], views[0], rtol=0, atol=2 * np.finfo(np.float32).eps)

    config.augment.color_jitter_prob = 0.0
    states, metrics, _ = _hand_run(config, jax.devices(), 1)
    states1, metrics1, _ = _hand_run(config, jax.devices()[:1], 1)
    keys = ("loss", "cpc_acc", "linear_loss", "grad_norm")
    assert_steps_agree((states1, metrics1), (states, metrics), keys)
    # (2 + 1) rows x 3 columns of predictions per image, each against 32 x 9 patches
    assert len(cpc.targets(config)) == (2 + 1) * 3
    assert np.isfinite(metrics[0]["loss"]) and 0 <= metrics[0]["cpc_acc"] <= 1
    assert "context0" in states[1].params and "head" not in states[1].params
    path = train.export_run(config, states[1], str(tmp_path))
    variables, meta = checkpoint.load_export(path)
    encoder = models.create_encoder(ml_collections.ConfigDict(meta["model"]))
    assert isinstance(encoder, patch_grid.PatchGridEncoder)
    feats = encoder.apply(
        {
            "params": variables["params"]["encoder"],
            "batch_stats": variables["batch_stats"]["encoder"],
        },
        jnp.zeros((2, 8, 8, 3)),
        train=False,
    )
    assert feats.shape == (2, models.feature_dim(18, 1, 4))


@pytest.mark.parametrize(
    "name,grid_side", [("cpc_digits", 3), ("cpc_cifar10", 3), ("cpc_imagenet", 7)]
)
def test_cpc_configs_validate(name, grid_side):
    from simclr_jax import config_base

    c = tiny.load_config(name)
    config_base.validate_config(c)
    assert c.method == "cpc" and cpc.grid(c) == grid_side


def test_layer_norm_resnet_normalises_each_example_on_its_own():
    """model.norm='layer' (CPC v2): no batch statistics, an example's features ignore the batch."""
    import ml_collections

    c = tiny.tiny_config()
    c.model.norm = "layer"
    enc = models.create_encoder(ml_collections.ConfigDict(c.model.to_dict()))
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = tiny.init(enc, jax.random.key(1), x, train=True)
    assert "batch_stats" not in variables
    alone = enc.apply(variables, x[:1], train=True)
    together = enc.apply(variables, x, train=True)[:1]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    c.model.norm = "group"
    from simclr_jax import config_base

    with pytest.raises(ConfigError, match="model.norm='group'"):
        config_base.validate_config(c)
