"""MoCo v2: EMA key encoder without gradients, FIFO queue of global keys, resume, configs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import load_config, model_and_optimizer, tiny_config
from tolerances import fp32_atol

from simclr_jax import checkpoint, config_base, data, losses, modes
from simclr_jax.methods import moco
from simclr_jax.methods.state import make_views, step_key
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import parallel

MOMENTUM = 0.99  # far enough from 1 that the EMA visibly moves the key encoder
STEPS = 4


def _moco_config():
    """The tiny digits run as MoCo: 4 steps, queue of 2 global batches (step 3 wraps around)."""
    c = tiny_config(method="moco", total_steps=STEPS, log_every_steps=1, checkpoint_every_steps=2)
    c.monitor_every_steps = 2
    c.moco.queue_size = 2 * c.batch_size
    c.moco.momentum = MOMENTUM
    c.eval.at_end = False
    return c


@pytest.fixture(scope="module")
def run():
    """STEPS MoCo steps on 8 devices; host copies of every state (the step donates its input)."""
    config = _moco_config()
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    model, tx, schedule = model_and_optimizer(config)
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    step_fn = pretrain_state.compile_train_step(
        config, model, tx, schedule, mesh, total_steps=STEPS
    )
    it = data.pretrain_iterator(config)
    states, batches, metrics = [jax.device_get(state)], [], []
    for _ in range(STEPS):
        batches.append(next(it))
        state, m = step_fn(state, parallel.host_to_global(batches[-1], mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return config, model, states, batches, metrics, step_fn


def _close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _max_abs_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def test_key_encoder_starts_as_the_query_encoder_and_moves_by_the_ema_rule(run):
    _, _, states, _, metrics, _ = run
    assert _max_abs_diff(states[0].method_state["key_params"], states[0].params) == 0.0
    for i in range(STEPS):
        before, after = states[i], states[i + 1]
        assert float(metrics[i]["moco_momentum"]) == pytest.approx(MOMENTUM)
        # key' = m * key + (1 - m) * query', query' being the params after the optimizer update.
        expected = jax.tree.map(
            lambda k, q: MOMENTUM * k + (1 - MOMENTUM) * q,
            before.method_state["key_params"],
            after.params,
        )
        _close(after.method_state["key_params"], expected)
    # Not vacuous: the query encoder moved (the LR warms up from 0, so step 1 does not), and the
    # key encoder now lags behind it.
    assert _max_abs_diff(states[-1].params, states[0].params) > 1e-3
    assert _max_abs_diff(states[-1].method_state["key_params"], states[-1].params) > 1e-4


def test_loss_gives_the_key_encoder_no_gradient(run):
    config, model, states, batches, _, _ = run
    mesh = parallel.make_mesh()
    state = jax.device_put(states[2], parallel.replicated(mesh))
    images = parallel.host_to_global(batches[0], mesh)["image"].astype(jnp.float32) / 255.0
    labels = parallel.host_to_global(batches[0], mesh)["label"]

    def loss_of(key_params):
        ms = {**state.method_state, "key_params": key_params}
        loss, aux = moco.moco_loss(
            state.params,
            state.replace(method_state=ms),
            images,
            jnp.flip(images, axis=2),
            labels,
            model=model,
            config=config,
            mesh=mesh,
        )
        return loss, aux["loss"]

    # The keys depend on the key params, and the loss on the keys: only the stop-gradient in
    # moco.key_embeddings makes this zero.
    g_key, loss = jax.jit(jax.grad(loss_of, has_aux=True))(state.method_state["key_params"])
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_key))


def _global_keys(config, model, state, images):
    """The key encoder's L2-normalised embeddings of a step's key views, recomputed on 1 device."""
    key = step_key(state)
    x = make_views(key, images, config)
    x_k = x.reshape((config.batch_size, 2) + x.shape[1:])[:, 1]
    out, _ = model.apply(
        {
            "params": state.method_state["key_params"],
            "batch_stats": state.method_state["key_batch_stats"],
        },
        x_k,
        train=True,
        mutable=["batch_stats"],
    )
    return losses.l2_normalize(out["projection"])


def test_queue_is_a_fifo_of_the_last_k_global_keys(run):
    config, model, states, batches, _, _ = run
    b = config.batch_size
    keys_of = jax.jit(lambda state, images: _global_keys(config, model, state, images))
    pre_step = zip(states[:STEPS], batches, strict=True)
    keys = [np.asarray(keys_of(s, bt["image"])) for s, bt in pre_step]
    queues = [np.asarray(s.method_state["queue"]) for s in states]
    ptrs = [int(s.method_state["queue_ptr"]) for s in states]
    assert queues[0].shape == (2 * b, config.model.head_out_dim)
    np.testing.assert_allclose(np.linalg.norm(queues[0], axis=1), 1.0, rtol=1e-5)
    # 8-device BN/conv reductions vs 1 device differ by ~2e-5; keys of different steps by ~0.1,
    # so the tolerance still tells which step's keys sit where. It is derived from the arithmetic
    # (tests/tolerances.py): BN statistics over the 32 key views x 8 x 8 positions, 19 conv/dense
    # + BN layers of 3 reductions and the L2 normalisation.
    key_tol = fp32_atol(keys, config.batch_size * 8 * 8, 3 * 19 + 1)
    assert min(np.max(np.abs(keys[i] - keys[i + 1])) for i in range(STEPS - 1)) > 0.05
    assert ptrs == [0, b, 0, b, 0]
    # Step 1 fills the first B rows and leaves the (random) rest.
    np.testing.assert_allclose(queues[1][:b], keys[0], atol=key_tol)
    np.testing.assert_array_equal(queues[1][b:], queues[0][b:])
    # From then on, the queue read from the pointer (oldest first) is the last 2 steps' keys.
    for step in (2, 3, 4):
        oldest_first = np.roll(queues[step], -ptrs[step], axis=0)
        want = np.concatenate(keys[step - 2 : step])
        np.testing.assert_allclose(oldest_first, want, atol=key_tol, err_msg=f"step {step}")


def test_metrics_are_finite_and_monitors_follow_the_cadence(run):
    _, _, _, _, metrics, step_fn = run
    assert step_fn._cache_size() == 1
    for m in metrics:
        for key in ("loss", "contrastive_acc", "linear_loss", "linear_acc", "lr", "grad_norm"):
            assert np.isfinite(m[key]), key
        assert 0.0 <= m["contrastive_acc"] <= 1.0
    # monitor_every_steps=2: computed on steps 2 and 4 only (zeros otherwise).
    assert [float(m["rankme"]) > 1.0 for m in metrics] == [False, True, False, True]
    assert [float(m["uniform"]) < 0.0 for m in metrics] == [False, True, False, True]


def test_train_resume_restores_the_queue(run, tmp_path):
    config, model, states, _, _, step_fn = run
    full = str(tmp_path / "full")
    with jax.transfer_guard("disallow"):  # the MoCo loop stays on device, like SimCLR's
        final = jax.device_get(modes.pretrain(config, full)["state"])
    # The loop computes what the hand-run steps computed.
    _close(final.method_state, states[-1].method_state, rtol=1e-5, atol=1e-6)

    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("rankme" in r) for r in rows] == [False, True, False, True]
    assert rows[-1]["rankme"] > 1.0 and rows[-1]["uniform"] < 0.0 and rows[-1]["align"] > 0.0

    # The checkpoint holds the queue: restoring onto the abstract state gives it back exactly.
    mesh = parallel.make_mesh()
    _, tx, _ = model_and_optimizer(config)
    abstract = pretrain_state.abstract_train_state(config, model, tx, mesh)
    assert abstract.method_state["queue"].shape == (2 * config.batch_size, 16)

    def restore(workdir):
        manager = checkpoint.create_manager(workdir)
        try:
            return checkpoint.restore_latest(manager, abstract, workdir)
        finally:
            manager.close()

    restored, _, step = restore(full)
    assert step == 4
    _close(jax.device_get(restored.method_state), final.method_state, rtol=0, atol=0)

    # Resuming from the step-2 checkpoint continues with its queue and key encoder.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(
        os.path.join(full, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2")
    )
    state, meta, step = restore(resumed)
    assert step == 2 and int(state.method_state["queue_ptr"]) == 0
    _close(jax.device_get(state.method_state), states[2].method_state, rtol=0, atol=0)
    it = data.pretrain_iterator(config, start_step=meta["data_step"])
    for _ in range(2):
        state, _ = step_fn(state, parallel.host_to_global(next(it), mesh))
    again = jax.device_get(state)
    _close(again.method_state, final.method_state, rtol=1e-5, atol=1e-6)
    _close(again.params, final.params, rtol=1e-5, atol=1e-6)


def test_enqueue_overwrites_the_oldest_rows():
    queue = jnp.zeros((6, 2))
    ptr = jnp.int32(0)
    for i in range(4):
        queue, ptr = moco.enqueue(queue, ptr, jnp.full((2, 2), i + 1.0))
    # Writes 1, 2, 3 fill the queue; write 4 replaces the oldest (1).
    np.testing.assert_array_equal(np.asarray(queue)[:, 0], [4, 4, 2, 2, 3, 3])
    assert int(ptr) == 2
    with pytest.raises(ValueError, match="multiple"):
        moco.enqueue(jnp.zeros((5, 2)), jnp.int32(0), jnp.ones((2, 2)))


def test_cosine_momentum_rises_to_one():
    config = _moco_config()
    config.moco.momentum = 0.99
    config.moco.momentum_cosine = True
    at = [float(moco.momentum_at(config, jnp.int32(s), 100)) for s in (0, 50, 100, 150)]
    np.testing.assert_allclose(at, [0.99, 0.995, 1.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="momentum_cosine"):
        moco.momentum_at(config, jnp.int32(0), 0)
    config.moco.momentum_cosine = False
    assert float(moco.momentum_at(config, jnp.int32(70), 100)) == pytest.approx(0.99)


def test_queue_size_is_validated_and_capped_to_the_dataset():
    config = load_config("digits")
    config.method = "moco"
    config_base.validate_config(config)  # the 65536 default is a multiple of 256
    # 1437 digits: the largest multiple of the batch that fits is 5 * 256.
    assert moco.queue_size(config, num_train_examples=1437) == 1280
    config.moco.queue_size = 1000
    with pytest.raises(config_base.ConfigError, match="moco.queue_size=1000.*multiple"):
        config_base.validate_config(config)
    with pytest.raises(ValueError, match="positive multiple of the global batch size"):
        moco.queue_size(config, num_train_examples=1437)
    config.moco.queue_size = 512
    config.simclr.decoupled = True  # SimCLR's own key: MoCo neither reads nor refuses it
    config_base.validate_config(config)


@pytest.mark.parametrize(
    "name,base,queue,momentum",
    [
        ("moco_digits", "digits", 1024, 0.99),
        ("moco_cifar10", "cifar10", 4096, 0.999),
        ("moco_imagenet", "imagenet", 65536, 0.999),
    ],
)
def test_moco_configs(name, base, queue, momentum):
    c = load_config(name)
    config_base.validate_config(c)
    assert c.method == "moco" and c.moco.queue_size == queue
    assert c.moco.temperature == 0.2 and c.moco.momentum == momentum
    b = load_config(base)
    assert (c.dataset, c.model.depth, c.augment.image_size) == (
        b.dataset,
        b.model.depth,
        b.augment.image_size,
    )
