"""MoCo v3: symmetric InfoNCE over the global batch, EMA key network, frozen patch projection."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import load_config, model_and_optimizer, tiny_config
from tolerances import EPS32, assert_trees_close, fp32_atol, fp32_rtol

from simclr_jax import checkpoint, config_base, data, models, modes, optim
from simclr_jax.methods import mocov3
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import parallel

STEPS = 4
MOMENTUM = 0.9  # far from 1: the EMA visibly moves the key network
VIEW_TOKENS = 32 * 5  # batch 32 x (4 patches + class token): the longest reduction of a view


def _config(**overrides):
    """The tiny digits run as MoCo v3 on the test ViT ('mu/4' at 8 px: 2 x 2 patches).

    Weight decay 0.1 (the paper's): the frozen patch projection must not decay. SGD, not the
    paper's AdamW: Adam's first updates are +-lr whatever the gradient's size, so leaves whose
    gradient is exactly 0 analytically (a bias before the head's BN) move by +-lr on the sign
    of rounding noise, which differs between 8 devices and 1. No warm-up: step 1 trains too.
    """
    c = tiny_config(method="mocov3", total_steps=STEPS, log_every_steps=1, checkpoint_every_steps=2)
    # Learned position embeddings: with sin-cos (zero for the class token) and the zero-init
    # class token, block 0's LayerNorm sees a zero vector and scales its gradient by
    # 1/sqrt(eps) = 1000, rounding noise included, too much for an 8-vs-1-device comparison.
    c.model.name, c.model.variant, c.model.posemb = "vit", "mu/4", "learn"
    c.model.head_layers = 3
    c.mocov3.predictor_hidden_dim = 16
    c.mocov3.momentum = MOMENTUM
    c.optim.name, c.optim.base_lr, c.optim.lr_scaling = "sgd", 0.1, "none"
    c.optim.weight_decay, c.optim.warmup_epochs = 0.1, 0
    c.monitor_every_steps = 2
    c.eval.at_end = False
    # Crops only: the colour ops are off at trace time and cost no compile time here.
    c.augment.color_jitter_prob = c.augment.grayscale_prob = 0.0
    c.augment.blur_prob = c.augment.solarize_prob = 0.0
    for k, v in overrides.items():
        c[k] = v
    return c


def _hand_run(config, devices, steps):
    """`steps` steps on `devices`: host copies of every state and the batches."""
    mesh = parallel.make_mesh(devices)
    model, tx, schedule = model_and_optimizer(config)
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    step_fn = pretrain_state.compile_train_step(config, model, tx, schedule, mesh)
    it = data.pretrain_iterator(config)
    states, batches, metrics = [jax.device_get(state)], [], []
    for _ in range(steps):
        batches.append(next(it))
        state, m = step_fn(state, parallel.host_to_global(batches[-1], mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, batches, metrics, step_fn


@pytest.fixture(scope="module")
def run():
    """STEPS MoCo v3 steps on 8 devices (compiled once for the module)."""
    config = _config()
    model, _, _ = model_and_optimizer(config)
    return config, model, _hand_run(config, jax.devices(), STEPS)


def _numpy_loss(q1, q2, k1, k2, t):
    def ctr(q, k):
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        k = k / np.linalg.norm(k, axis=1, keepdims=True)
        logits = q @ k.T / t
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_p)) * 2 * t

    return ctr(q1, k2) + ctr(q2, k1)


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    q1, q2, k1, k2 = (rng.normal(size=(6, 5)) for _ in range(4))
    args = [jnp.asarray(a, jnp.float32) for a in (q1, q2, k1, k2)]
    for t in (0.2, 1.0):
        loss, acc = mocov3.symmetric_loss(*args, temperature=t)
        # Sums of 5 terms (dot products) then 6 (softmax), in 2 stacked reductions.
        np.testing.assert_allclose(loss, _numpy_loss(q1, q2, k1, k2, t), rtol=fp32_rtol(6, 4))
        assert 0.0 <= float(acc) <= 1.0
    # Identical queries and keys: every query finds its own key (accuracy 1).
    _, acc = mocov3.symmetric_loss(args[0], args[0], args[0], args[0], temperature=0.2)
    assert float(acc) == 1.0


def test_sharded_loss_and_gradient_equal_the_unsharded_ones():
    """8 devices, rows that differ per device: value and query gradient as on the whole batch."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(1)
    q1, q2, k1, k2 = (jnp.asarray(rng.normal(size=(32, 8)), jnp.float32) for _ in range(4))
    sharded = mocov3.sharded_loss(mesh, 0.2)
    put = jax.device_put

    def value(fn, *a):
        return fn(*a, temperature=0.2)[0] if fn is mocov3.symmetric_loss else fn(*a)[0]

    want, want_g = jax.value_and_grad(value, argnums=(1, 2))(mocov3.symmetric_loss, q1, q2, k1, k2)
    on_data = [put(x, parallel.data_sharded(mesh)) for x in (q1, q2, k1, k2)]
    got, got_g = jax.jit(jax.value_and_grad(value, argnums=(1, 2)), static_argnums=0)(
        sharded, *on_data
    )
    tol = fp32_rtol(32, 4)
    np.testing.assert_allclose(got, want, rtol=tol)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, atol=tol * float(jnp.max(jnp.abs(w))))
    assert float(jnp.max(jnp.abs(want_g[0]))) > 0  # not vacuous


def test_momentum_schedule_and_key_ema_by_hand(run):
    config, _, (states, _, metrics, step_fn) = run
    assert step_fn._cache_size() == 1
    # The key network is a copy of the query encoder + projector, without the predictor.
    key0 = states[0].method_state["key_params"]
    assert "predictor" in states[0].params and "predictor" not in key0
    for a, b in zip(
        jax.tree.leaves(mocov3.key_part(states[0].params)), jax.tree.leaves(key0), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for k in range(STEPS):
        # m_k = 1 - (1 - m)(cos(pi k / K) + 1) / 2, K = the run's steps.
        m_k = 1 - (1 - MOMENTUM) * (math.cos(math.pi * k / STEPS) + 1) / 2
        m32 = np.float32(metrics[k]["mocov3_momentum"])
        assert float(m32) == pytest.approx(m_k, abs=1e-7)
        # As the official code: the key network moves towards the query network *before* the
        # step's update (the params of state k), then encodes the keys. In float32 with the
        # step's rate: 1 - m cancels, so a float64 m would differ by ~eps / (1 - m) relative.
        want = jax.tree.map(
            lambda key, q, m=m32: m * key + (np.float32(1) - m) * q,
            states[k].method_state["key_params"],
            mocov3.key_part(states[k].params),
        )
        assert_trees_close(states[k + 1].method_state["key_params"], want, reduction_len=2, depth=2)
    assert float(metrics[0]["mocov3_momentum"]) == pytest.approx(MOMENTUM)
    # Not vacuous: the query network moved, and the key network lags behind it.
    key_final = states[-1].method_state["key_params"]["head"]["dense1"]["kernel"]
    query_final = states[-1].params["head"]["dense1"]["kernel"]
    assert np.max(np.abs(query_final - states[0].params["head"]["dense1"]["kernel"])) > 1e-3
    assert np.max(np.abs(key_final - query_final)) > 1e-4


def test_frozen_patch_projection_stays_bit_identical(run):
    config, _, (states, _, _, _) = run
    assert mocov3.frozen_params(config) == (("encoder", "embedding"),)
    first = states[0].params["encoder"]["embedding"]
    assert set(first) == {"kernel", "bias"} and float(np.max(np.abs(first["kernel"]))) > 0
    for s in states[1:]:
        for part in ("params", "key"):
            tree = s.params if part == "params" else s.method_state["key_params"]
            for name in ("kernel", "bias"):
                np.testing.assert_array_equal(tree["encoder"]["embedding"][name], first[name])
    # Everything else trains: the blocks, the class token and every head moved.
    for path in (
        ("encoder", "Transformer", "encoderblock_0", "MlpBlock_0", "Dense_0", "kernel"),
        ("encoder", "cls"),
        ("head", "dense3", "kernel"),
        ("predictor", "dense2", "kernel"),
    ):
        before, after = states[0].params, states[-1].params
        for k in path:
            before, after = before[k], after[k]
        assert np.max(np.abs(after - before)) > 1e-4, path


def test_optimizer_freeze_by_hand():
    """AdamW with weight decay on a tiny tree: the frozen subtree gets no update, no state."""
    params = {
        "encoder": {"embedding": {"kernel": jnp.ones((2, 2))}, "w": {"kernel": jnp.ones((2, 2))}}
    }
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.freeze(optax.adamw(0.1, weight_decay=0.1), params, [("encoder", "embedding")])
    state = tx.init(params)
    sizes = [x.size for x in jax.tree.leaves(state)]
    assert sum(sizes) == 1 + 2 * 4  # Adam's count and two moments of the trained kernel only
    p = params
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p["encoder"]["embedding"]["kernel"], 1.0)
    assert float(jnp.max(jnp.abs(p["encoder"]["w"]["kernel"] - 1.0))) > 0.1
    with pytest.raises(ValueError, match="no 'patch' among"):
        optim.freeze(optax.sgd(0.1), params, [("encoder", "patch")])


def test_key_network_gets_no_gradient(run):
    config, model, (states, batches, _, _) = run
    mesh = parallel.make_mesh()
    state = jax.device_put(states[2], parallel.replicated(mesh))
    batch = parallel.host_to_global(batches[0], mesh)
    x1 = batch["image"].astype(jnp.float32) / 255.0
    x2 = jnp.flip(x1, axis=2)

    def loss_of(key_params, params):
        k1, k2, _ = mocov3.key_projections(
            model, key_params, state.method_state["key_batch_stats"], x1, x2
        )
        loss, aux = mocov3.mocov3_loss(
            params,
            state.batch_stats,
            x1,
            x2,
            k1,
            k2,
            batch["label"],
            model=model,
            config=config,
            mesh=mesh,
        )
        return aux["loss"]

    # The keys depend on the key params and the loss on the keys: only the stop-gradient in
    # key_projections makes these zero; the query params' gradient is not, but the frozen
    # patch projection's is (its stop-gradient in mocov3_loss).
    g_key, g_query = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(
        state.method_state["key_params"], state.params
    )
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_key))
    assert all(
        float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_query["encoder"]["embedding"])
    )
    assert float(jnp.max(jnp.abs(g_query["head"]["dense1"]["kernel"]))) > 0.0


def _assert_updates_close(actual, desired, before, reduction_len, depth):
    """Params after a step agree to the rounding of the step, scaled by the largest change.

    Not leaf by leaf: some gradients are exactly 0 analytically (the encoder's final LayerNorm
    bias shifts every pooled feature alike, which the projector's BN removes), so their leaf
    holds only rounding noise of sums whose terms are the size of the other leaves' gradients.
    """
    change = [
        np.asarray(d, np.float64) - b
        for d, b in zip(jax.tree.leaves(desired), jax.tree.leaves(before), strict=True)
    ]
    atol = fp32_atol(np.concatenate([c.ravel() for c in change]), reduction_len, depth)
    flat = jax.tree_util.tree_leaves_with_path(actual)
    for (path, a), d in zip(flat, jax.tree.leaves(desired), strict=True):
        np.testing.assert_allclose(
            a, d, rtol=2 * EPS32, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def test_sharded_steps_equal_the_single_device_steps(run):
    """Steps 1 and 2 on one device from the 8-device run's state before each: the same update.

    Each step starts from the same state (not a chain of its own), so the comparison is one
    step's rounding, not two steps' compounded through the network.
    """
    config, model, (states8, batches, metrics8, _) = run
    mesh = parallel.make_mesh(jax.devices()[:1])
    _, tx, schedule = model_and_optimizer(config)
    step = pretrain_state.compile_train_step(config, model, tx, schedule, mesh)
    depth = 30  # 1 block (LN, attention, LN, MLP) + 3 head + 2 predictor layers, forward + backward
    for k in range(2):
        state = jax.device_put(states8[k], parallel.replicated(mesh))
        state1, metrics1 = jax.device_get(step(state, parallel.host_to_global(batches[k], mesh)))
        for key in ("loss", "contrastive_acc", "linear_loss", "grad_norm"):
            np.testing.assert_allclose(
                metrics8[k][key], metrics1[key], rtol=fp32_rtol(VIEW_TOKENS, depth), err_msg=key
            )
        _assert_updates_close(
            state1.params, states8[k + 1].params, states8[k].params, VIEW_TOKENS, depth
        )
        _assert_updates_close(
            state1.method_state,
            states8[k + 1].method_state,
            states8[k].method_state,
            VIEW_TOKENS,
            depth,
        )


def test_resume_is_bit_exact(run, tmp_path):
    """The loop resumed from the step-2 state (key network included) ends on the hand-run bits."""
    config, _, (states, _, _, _) = run
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh()
    manager = checkpoint.create_manager(workdir)
    checkpoint.save(
        manager,
        2,
        jax.device_put(states[2], parallel.replicated(mesh)),
        {"step": 2, "data_step": 2},
    )
    manager.wait_until_finished()
    manager.close()
    final = jax.device_get(modes.pretrain(config, workdir)["state"])
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(states[-1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_heads_follow_the_official_builder():
    """Dense layers without bias; projector and ViT predictor end in an affine-free BN."""
    for name, out_bn in (("vit", True), ("resnet", False)):
        config = _config() if name == "vit" else tiny_config(method="mocov3")
        model = mocov3.build_model(config, num_classes=10)
        shapes = jax.eval_shape(lambda m=model: models.init_variables(m, jax.random.key(0), 8))
        pred, head = shapes["params"]["predictor"], shapes["params"]["head"]
        last = f"bn{config.model.head_layers}"
        assert last not in head and f"dense{config.model.head_layers}" in head  # no scale, shift
        assert all(
            set(head[f"dense{i + 1}"]) == {"kernel"} for i in range(config.model.head_layers)
        )
        assert set(pred["dense1"]) == set(pred["dense2"]) == {"kernel"}
        assert ("bn2" in shapes["batch_stats"]["predictor"]) == out_bn, name


def test_encoder_dependent_defaults_and_refusals():
    vit = _config()
    resnet = tiny_config(method="mocov3")
    config_base.validate_config(vit)
    config_base.validate_config(resnet)
    assert vit.mocov3.temperature == resnet.mocov3.temperature == -1
    assert mocov3.temperature(vit) == 0.2 and mocov3.temperature(resnet) == 1.0
    assert mocov3.frozen_params(resnet) == ()
    vit.mocov3.freeze_patch_embed = False
    assert mocov3.frozen_params(vit) == ()
    resnet.mocov3.temperature = 0.5
    assert mocov3.temperature(resnet) == 0.5
    (line,) = mocov3.resolve(_config(), 600, 1437)
    assert (
        "temperature 0.2" in line and "from 0.9 to 1" in line and "patch projection frozen" in line
    )
    resnet.mocov3.freeze_patch_embed = True
    with pytest.raises(config_base.ConfigError, match=r"freeze_patch_embed=True.*'resnet'") as e:
        config_base.validate_config(resnet)
    assert "\n" not in str(e.value)
    for key, bad in (("momentum", 1.0), ("temperature", 0.0), ("predictor_hidden_dim", 0)):
        c = tiny_config(method="mocov3")
        c.mocov3[key] = bad
        with pytest.raises(config_base.ConfigError, match=f"mocov3.{key}"):
            config_base.validate_config(c)


@pytest.mark.parametrize(
    "name,base,encoder",
    [
        ("mocov3_digits", "digits", "resnet"),
        ("mocov3_cifar10", "cifar10", "vit"),
        ("mocov3_imagenet", "imagenet", "vit"),
    ],
)
def test_mocov3_configs(name, base, encoder):
    c = load_config(name)
    config_base.validate_config(c)
    assert c.method == "mocov3" and c.model.name == encoder
    assert c.mocov3.momentum == 0.99 and c.mocov3.momentum_cosine
    b = load_config(base)
    assert (c.dataset, c.augment.image_size) == (b.dataset, b.augment.image_size)
    if encoder == "vit":
        assert mocov3.temperature(c) == 0.2 and mocov3.frozen_params(c)
        assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
        assert (c.model.head_layers, c.model.head_hidden_dim, c.model.head_out_dim) == (
            3,
            4096,
            256,
        )
        assert c.optim.warmup_epochs == 40 and c.num_epochs == 300 and c.model.posemb == "sincos2d"
    if name == "mocov3_imagenet":
        assert (c.model.variant, c.batch_size) == ("B/16", 4096)
    if name == "mocov3_cifar10":
        assert c.model.variant == "S/4"
