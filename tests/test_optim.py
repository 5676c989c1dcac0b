"""LARS masks on a real ResNet tree, a hand-computed LARS step, and the LR schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from tiny import init

from simclr_jax import config_base, optim
from simclr_jax.models import create_model


def _config(**optim_overrides):
    c = config_base.base_config()
    c.model.depth, c.model.stem, c.model.base_width = 18, "cifar", 4
    c.model.head_hidden_dim, c.model.head_out_dim = 16, 8
    c.batch_size = 512
    c.num_epochs = 100
    c.optim.warmup_epochs = 10
    for k, v in optim_overrides.items():
        c.optim[k] = v
    return c


def _resnet_params():
    model = create_model(_config(), num_classes=10)
    return init(model, jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False)["params"]


def test_masks_select_exactly_the_kernels_of_a_real_resnet():
    params = _resnet_params()
    flat = traverse_util.flatten_dict(optim.decay_mask(params), sep="/")
    decayed = {k for k, v in flat.items() if v}
    excluded = {k for k, v in flat.items() if not v}
    assert decayed and excluded
    assert all(k.endswith("/kernel") for k in decayed)
    # Every bias and every BatchNorm scale/bias is excluded.
    assert all(k.endswith(("/bias", "/scale")) for k in excluded)
    assert any("/bn" in k or "_bn/" in k for k in excluded)
    assert "linear_head/dense/bias" in excluded
    assert "encoder/stem_bn/scale" in excluded
    assert "encoder/stage1_block1/conv1/kernel" in decayed
    assert "head/dense1/kernel" in decayed
    kernel_leaves = [k for k in flat if k.endswith("/kernel")]
    assert len(decayed) == len(kernel_leaves)


def test_one_lars_step_matches_hand_computation():
    c = _config(weight_decay=1e-2, trust_coefficient=1e-3, momentum=0.9)
    params = {"dense": {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.array([1.0, -1.0])}}
    grads = {"dense": {"kernel": jnp.array([[0.6, 0.8]]), "bias": jnp.array([0.5, 0.25])}}
    tx, schedule = optim.make_optimizer(c, params, steps_per_epoch=10)
    state = tx.init(params)
    # Evaluate at a step where the LR is non-zero: advance the count past warmup's first step.
    for _ in range(5):
        updates, state = tx.update(grads, state, params)
    # optax.lars applies the LR before the momentum trace: trace_4 = sum_t 0.9^(4-t) lr_t u.
    lr_weight = sum(0.9 ** (4 - t) * float(schedule(t)) for t in range(5))
    assert lr_weight > 0
    # Hand computation, kernel: g + wd * w, scaled by trust ratio eta * |w| / |g + wd w|.
    w, g = np.array([3.0, 4.0]), np.array([0.6, 0.8])
    g_wd = g + 1e-2 * w
    trust = 1e-3 * np.linalg.norm(w) / np.linalg.norm(g_wd)
    scaled = trust * g_wd
    np.testing.assert_allclose(
        np.asarray(updates["dense"]["kernel"])[0], -lr_weight * scaled, rtol=1e-5
    )
    # Bias: no weight decay, no trust ratio.
    bias = np.array([0.5, 0.25])
    np.testing.assert_allclose(np.asarray(updates["dense"]["bias"]), -lr_weight * bias, rtol=1e-5)


def test_schedule_values_at_warmup_end_and_last_step():
    c = _config(base_lr=0.3, lr_scaling="linear")
    steps_per_epoch = 20
    schedule = optim.make_schedule(c, steps_per_epoch)
    peak = 0.3 * 512 / 256
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(100)), peak / 2, rtol=1e-6)  # half-way in warmup
    np.testing.assert_allclose(float(schedule(200)), peak, rtol=1e-6)  # warmup end (10 epochs)
    total = 100 * steps_per_epoch
    mid = 200 + (total - 200) // 2
    np.testing.assert_allclose(float(schedule(mid)), peak / 2, rtol=1e-3)  # cosine midpoint
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-9)


def test_sqrt_scaling_and_total_steps_override():
    c = _config(base_lr=0.075, lr_scaling="sqrt")
    c.total_steps = 50
    c.optim.warmup_epochs = 1
    assert optim.total_train_steps(c, steps_per_epoch=20) == 50
    schedule = optim.make_schedule(c, steps_per_epoch=20)
    np.testing.assert_allclose(float(schedule(20)), 0.075 * np.sqrt(512), rtol=1e-6)
    assert float(schedule(50)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_finetuning_optimizers_step(name):
    params = _resnet_params()
    c = _config(name=name, base_lr=0.1, weight_decay=1e-4)
    tx, _ = optim.make_optimizer(c, params, steps_per_epoch=10)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new, params)
    assert all(v > 0 for v in jax.tree.leaves(moved))


def test_bad_optimizer_settings_raise():
    params = {"w": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="optim.name='lamb'"):
        optim.make_optimizer(_config(name="lamb"), params, 10)
    with pytest.raises(ValueError, match="optim.lr_scaling='cube'"):
        optim.make_optimizer(_config(lr_scaling="cube"), params, 10)
