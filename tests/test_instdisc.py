"""InstDisc: NCE / InfoNCE against numpy, the bank update by hand, the row-sharded bank,
sharded == single-device steps, the loss falls, bit-exact resume, example indices from the data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import load_config, model_and_optimizer, tiny_config
from tolerances import EPS32, assert_trees_close, fp32_rtol

from simclr_jax import checkpoint, config_base, data, losses, modes
from simclr_jax.data import datasets, streams
from simclr_jax.methods import instdisc
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import parallel

STEPS = 30
BATCH = 128  # 11 steps an epoch: by step 30 every example has met its updated bank row
VIEW_PIXELS = 2 * BATCH * 8 * 8  # the step's longest reduction
N_DIGITS = 1437


def _config(**overrides):
    c = tiny_config(
        method="instdisc",
        batch_size=BATCH,
        total_steps=STEPS,
        log_every_steps=1,
        checkpoint_every_steps=10,
    )
    c.monitor_every_steps = 10
    c.instdisc.num_negatives = 256
    c.eval.at_end = False
    for k, v in overrides.items():
        c[k] = v
    return c


def _hand_run(config, devices, steps):
    """`steps` steps on `devices`: host copies of every state, the batches and the metrics."""
    mesh = parallel.make_mesh(devices)
    model, tx, schedule = model_and_optimizer(config)
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    step_fn = pretrain_state.compile_train_step(config, model, tx, schedule, mesh)
    it = data.pretrain_iterator(config, with_index=True)
    states, batches, metrics = [jax.device_get(state)], [], []
    for _ in range(steps):
        batches.append(next(it))
        state, m = step_fn(state, parallel.host_to_global(batches[-1], mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return {
        "states": states,
        "batches": batches,
        "metrics": metrics,
        "last": state,
        "step_fn": step_fn,
        "mesh": mesh,
    }


@pytest.fixture(scope="module")
def run():
    """The tiny InstDisc run on 8 devices, stepped by hand (one compiled step)."""
    config = _config()
    return config, _hand_run(config, jax.devices(), STEPS)


# ---------------------------------------------------------------- the loss against numpy


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_losses(q, k, neg, t, log_z, n):
    q, k, neg = _unit(q), _unit(k), _unit(neg)
    pos, negs = np.sum(q * k, -1) / t, q @ neg.T / t
    noise = neg.shape[0] / n  # K P_n
    p_pos, p_neg = np.exp(pos - log_z), np.exp(negs - log_z)
    nce = -np.log(p_pos / (p_pos + noise)) - np.sum(np.log(noise / (p_neg + noise)), -1)
    logits = np.concatenate([pos[:, None], negs], -1)
    top = logits.max(-1, keepdims=True)
    info = (np.log(np.sum(np.exp(logits - top), -1)) + top[:, 0]) - pos
    z = n * np.mean(np.exp(negs))
    return np.mean(nce), np.mean(info), z


def test_nce_and_infonce_match_numpy():
    rng = np.random.default_rng(0)
    b, k, d, t, n = 12, 20, 8, 0.07, 500
    q, pos = rng.normal(size=(b, d)), rng.normal(size=(b // 2, d))
    neg = rng.normal(size=(k, d))
    keys = np.repeat(pos, 2, axis=0)  # two views per example share its bank row
    log_z = np.log(n * 1.7)
    want_nce, want_info, want_z = _numpy_losses(q, keys, neg, t, log_z, n)
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, keys, neg, pos)]
    # Logits of size 1/t, sums over D then over K + 1 terms.
    atol = EPS32 * np.sqrt(k + 1) * 4 * (1 / t) * max(1.0, k * 0.1)
    nce, acc = losses.instdisc_nce(f32[0], f32[1], f32[2], t, jnp.float32(log_z), n)
    np.testing.assert_allclose(nce, want_nce, rtol=fp32_rtol(d, 4), atol=atol)
    got_z = instdisc.estimate_z(f32[0], f32[2], t, n)
    np.testing.assert_allclose(got_z, want_z, rtol=fp32_rtol(k * d, 4) / t)
    for loss, want in (("nce", None), ("infonce", want_info)):
        value, _, z = instdisc.instdisc_loss(
            f32[0], f32[3], f32[2], jnp.float32(0.0), loss=loss, temperature=t, num_data=n
        )
        if loss == "nce":  # Z = 0: estimated from these negatives, then used
            np.testing.assert_allclose(z, want_z, rtol=fp32_rtol(k * d, 4) / t)
            want = _numpy_losses(q, keys, neg, t, np.log(want_z), n)[0]
        np.testing.assert_allclose(value, want, rtol=fp32_rtol(d, 4), atol=atol, err_msg=loss)
    assert 0.0 <= float(acc) <= 1.0
    # The bank rows get no gradient; the queries do.
    g = jax.grad(
        lambda p: instdisc.instdisc_loss(
            f32[0], p, f32[2], jnp.float32(1e3), loss="nce", temperature=t, num_data=n
        )[0]
    )(f32[3])
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_sharded_loss_equals_the_unsharded_one():
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)  # 16 examples x 2 views
    pos = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    neg = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
    rest = (pos, neg, jnp.float32(0.0))
    args = (q, *rest)
    for loss in instdisc.LOSSES:
        kw = dict(loss=loss, temperature=0.1, num_data=300)
        sharded = instdisc._sharded_loss(mesh, **kw)
        want = instdisc.instdisc_loss(*args, **kw)
        got = jax.jit(sharded)(*args)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=fp32_rtol(32 * 10, 4), err_msg=loss)
        g_want = jax.grad(lambda x, kw=kw: instdisc.instdisc_loss(x, *rest, **kw)[0])(q)
        g_got = jax.jit(jax.grad(lambda x, f=sharded: f(x, *rest)[0]))(q)
        np.testing.assert_allclose(g_got, g_want, atol=fp32_rtol(32 * 10, 4) * 10, err_msg=loss)


# ---------------------------------------------------------------- the bank by hand


def test_bank_update_rule_by_hand_on_a_tiny_sharded_bank():
    """Momentum 0.5, renormalised, only the batch's rows change; reads are exact."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(2)
    rows, d = 16, 4  # 2 rows per device
    bank_np = _unit(rng.normal(size=(rows, d))).astype(np.float32)
    index_np = np.array([3, 10, 0, 15, 7, 8, 1, 12], np.int32)  # one example per device
    views_np = rng.normal(size=(8, 2, d)).astype(np.float32)
    bank = jax.device_put(bank_np, NamedSharding(mesh, P("data")))
    index = jax.device_put(index_np, parallel.data_sharded(mesh))
    views = jax.device_put(views_np, parallel.data_sharded(mesh))

    @jax.jit
    def update(bank, index, views):
        old = instdisc.read_batch_rows(mesh)(bank, index)
        new = instdisc.update_rows(old, views, 0.5)
        return old, instdisc.write_rows(mesh)(bank, index, new)

    old, new_bank = update(bank, index, views)
    np.testing.assert_array_equal(old, bank_np[index_np])  # a psum of one row and zeros: exact
    assert new_bank.sharding.spec == P("data")
    f = _unit(np.mean(_unit(views_np.astype(np.float64)), axis=1))
    want = bank_np.astype(np.float64).copy()
    want[index_np] = _unit(0.5 * bank_np[index_np] + 0.5 * f)
    new_np = np.asarray(new_bank)
    np.testing.assert_allclose(new_np, want, rtol=0, atol=fp32_rtol(d, 4))
    untouched = np.setdiff1d(np.arange(rows), index_np)
    np.testing.assert_array_equal(new_np[untouched], bank_np[untouched])
    np.testing.assert_allclose(np.linalg.norm(new_np, axis=-1), 1.0, rtol=4 * EPS32)
    # Replicated reads (the negatives), repeats included, are exact too.
    idx = jnp.array([5, 5, 0, 15, 9], jnp.int32)
    got = jax.jit(instdisc.read_rows(mesh))(bank, idx)
    np.testing.assert_array_equal(got, bank_np[np.asarray(idx)])


# ---------------------------------------------------------------- the tiny run


def test_bank_is_sharded_by_rows_and_the_step_writes_the_batch_rows(run):
    config, r = run
    bank = r["last"].method_state["bank"]
    n_pad = instdisc.bank_rows(N_DIGITS)
    assert bank.shape == (n_pad, 16) and n_pad % 8 == 0 and n_pad >= N_DIGITS
    assert bank.sharding.spec == P("data")
    assert {s.data.shape for s in bank.addressable_shards} == {(n_pad // 8, 16)}
    assert r["last"].params["encoder"]["stem_conv"]["kernel"].sharding.spec == P()
    states, batches, metrics = r["states"], r["batches"], r["metrics"]
    for k in range(2):
        before, after = states[k].method_state["bank"], states[k + 1].method_state["bank"]
        changed = np.flatnonzero(np.any(before != after, axis=-1))
        np.testing.assert_array_equal(changed, np.sort(batches[k]["index"]))
        np.testing.assert_allclose(np.linalg.norm(after, axis=-1), 1.0, rtol=1e-6)
    for b in batches:
        assert b["index"].dtype == np.int32 and 0 <= b["index"].min() <= b["index"].max() < 1437
    # NCE's Z: estimated on step 1, then fixed.
    z = [float(m["nce_z"]) for m in metrics]
    assert states[0].method_state["z"] == 0.0 and z[0] > 0 and len(set(z)) == 1
    assert float(states[-1].method_state["z"]) == z[0]
    for m in metrics:
        for key in ("loss", "linear_loss", "contrastive_acc", "grad_norm"):
            assert np.isfinite(m[key]), key


def test_sharded_steps_equal_the_single_device_steps(run):
    config, r8 = run
    r1 = _hand_run(config, jax.devices()[:1], 2)
    for k in range(2):
        for key in ("loss", "linear_loss", "grad_norm", "nce_z"):
            np.testing.assert_allclose(
                r8["metrics"][k][key],
                r1["metrics"][k][key],
                rtol=fp32_rtol(VIEW_PIXELS, 40),
                err_msg=key,
            )
    for k in (1, 2):
        assert_trees_close(
            r1["states"][k].params,
            r8["states"][k].params,
            reduction_len=VIEW_PIXELS,
            depth=40 * k,
            before=r8["states"][k - 1].params,
        )
        assert_trees_close(
            r1["states"][k].method_state,
            r8["states"][k].method_state,
            reduction_len=VIEW_PIXELS,
            depth=40 * k,
        )


def test_loss_falls_over_30_steps_of_the_bank_and_loss():
    """30 steps of the sharded objective and bank on free embeddings: the NCE loss falls.

    The network is replaced by a table of embeddings (one per example, two noisy views), so the
    test sees the bank's reads and writes and the loss's gradients, not the encoder's speed. On
    the tiny ResNet the loss rises over its first epochs while the random bank fills with the
    network's embeddings; the digits run's end-of-run table is the test of learning there.
    """
    mesh = parallel.make_mesh()
    n, d, b, k, t = 64, 8, 16, 16, 0.1
    kw = dict(loss="nce", temperature=t, num_data=n)
    loss_of = instdisc._sharded_loss(mesh, **kw)
    noise = 0.3 * jax.random.normal(jax.random.key(1), (2, n, d))

    @jax.jit
    def step(table, bank, z, key):
        index = jax.random.permutation(key, n)[:b].astype(jnp.int32)
        index = jax.lax.with_sharding_constraint(index, parallel.data_sharded(mesh))
        negatives = instdisc.read_rows(mesh)(bank, jax.random.randint(key, (k,), 0, n))
        positives = instdisc.read_batch_rows(mesh)(bank, index)

        def loss_fn(table):
            views = jnp.stack([table[index] + noise[0, index], table[index] + noise[1, index]], 1)
            value, _, z_used = loss_of(views.reshape(2 * b, d), positives, negatives, z)
            return value, (views, z_used)

        (value, (views, z_used)), g = jax.value_and_grad(loss_fn, has_aux=True)(table)
        rows = instdisc.update_rows(positives, jax.lax.stop_gradient(views), 0.5)
        return table - 0.05 * g, instdisc.write_rows(mesh)(bank, index, rows), z_used, value

    table = jax.random.normal(jax.random.key(2), (n, d))
    bank = jax.device_put(
        losses.l2_normalize(jax.random.normal(jax.random.key(3), (n, d))),
        NamedSharding(mesh, P("data")),
    )
    z, loss = jnp.float32(0.0), []
    for i in range(30):
        table, bank, z, value = step(table, bank, z, jax.random.key(10 + i))
        loss.append(float(value))
    assert bank.sharding.spec == P("data")
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5]), loss


def test_resume_is_bit_exact(run, tmp_path):
    """The loop resumed from the step-2 state (bank and Z included) ends on the hand-run bits."""
    config, r = run
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh()
    model, tx, _ = model_and_optimizer(config)
    shardings = pretrain_state.state_shardings(config, model, tx, mesh)
    manager = checkpoint.create_manager(workdir)
    checkpoint.save(
        manager, 2, jax.device_put(r["states"][2], shardings), {"step": 2, "data_step": 2}
    )
    manager.wait_until_finished()
    manager.close()
    final = modes.pretrain(config, workdir)["state"]
    assert final.method_state["bank"].sharding.spec == P("data")
    final = jax.device_get(final)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(r["states"][-1]), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- config and data


def test_config_validation_resolve_and_configs():
    config = _config()
    config.instdisc.loss = "hinge"
    with pytest.raises(config_base.ConfigError, match=r"instdisc.loss='hinge'.*'nce'"):
        config_base.validate_config(config)
    config = _config()
    config.instdisc.bank_momentum = 1.0
    with pytest.raises(config_base.ConfigError, match=r"instdisc.bank_momentum=1.0"):
        config_base.validate_config(config)
    instdisc.validate(_config(dataset="stl10"))  # tfds streams carry indices too
    config = _config()
    config.instdisc.num_negatives = 4096
    lines = instdisc.resolve(config, 30, N_DIGITS)
    assert "1436 negatives" in lines[0] and "capped to 1436" in lines[1]
    assert instdisc.num_negatives(config, N_DIGITS) == 1436
    digits = load_config("instdisc_digits")
    config_base.validate_config(digits)
    assert digits.method == "instdisc" and digits.model.head_out_dim == 128
    assert instdisc.num_negatives(digits, N_DIGITS) == 1024
    imagenet = load_config("instdisc_imagenet")
    assert (imagenet.instdisc.num_negatives, imagenet.instdisc.temperature) == (4096, 0.07)
    assert (imagenet.optim.name, imagenet.optim.base_lr, imagenet.optim.weight_decay) == (
        "sgd",
        0.03,
        5e-4,
    )
    # --config.method=instdisc on any config picks it (its section is in every base config).
    other = load_config("digits")
    other.method = "instdisc"
    config_base.validate_config(other)


def test_in_memory_indices_name_each_example_once_an_epoch():
    config = tiny_config(batch_size=32)
    images, _ = datasets.memory_arrays(config, "train")
    steps = N_DIGITS // 32
    it = data.pretrain_iterator(config, with_index=True)
    plain = data.pretrain_iterator(config)
    seen = []
    for _ in range(steps):
        b, p = next(it), next(plain)
        np.testing.assert_array_equal(b["image"], images[b["index"]])  # the index is the row
        for key in ("image", "label"):  # with_index only adds the key
            np.testing.assert_array_equal(b[key], p[key])
        assert set(p) == {"image", "label"}
        seen.append(b["index"])
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == steps * 32 and seen.min() >= 0 and seen.max() < N_DIGITS
    # The epoch is the documented permutation (its last N mod B examples wait for a later epoch).
    order = np.random.default_rng([config.seed, 0]).permutation(N_DIGITS)
    np.testing.assert_array_equal(seen, order[: steps * 32])
    # Two hosts: the two halves of the same global batches; a resumed stream continues it.
    halves = [
        next(data.pretrain_iterator(config, process_index=p, process_count=2, with_index=True))
        for p in (0, 1)
    ]
    np.testing.assert_array_equal(np.concatenate([h["index"] for h in halves]), seen[:32])
    resumed = next(data.pretrain_iterator(config, start_step=3, with_index=True))
    np.testing.assert_array_equal(resumed["index"], seen[96:128])


def test_image_folder_indices_are_positions_in_the_whole_split(tmp_path):
    from PIL import Image

    for c, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        for i in range(4):  # each image one grey level: 40 x (its position in the split) + 10
            Image.new("RGB", (12, 12), (40 * (4 * c + i) + 10,) * 3).save(
                tmp_path / name / f"{i}.png"
            )
    config = tiny_config(dataset="image_folder", batch_size=2)
    config.data.folder = str(tmp_path)
    _, splits = datasets.folder_splits(str(tmp_path))
    paths = list(splits["train"][0])
    for p in (0, 1):
        it = data.pretrain_iterator(config, process_index=p, process_count=2, with_index=True)
        for step in range(3):
            b = next(it)
            for image, index in zip(b["image"], b["index"], strict=True):
                grey = int(paths[index].split("/")[-2] == "b") * 4 + int(paths[index][-5])
                assert abs(int(image[4, 4, 0]) - (40 * grey + 10)) <= 2
            # Host p holds row p of each global batch of the whole split's seeded permutation.
            want = streams.batch_indices(config.seed, len(paths), 2, step)[p : p + 1]
            np.testing.assert_array_equal(b["index"], want)


@pytest.mark.parametrize("dataset", ["imagenet2012", "stl10"])
def test_tfds_indices_number_the_whole_split_across_hosts_and_resume(dataset):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny_config(dataset=dataset, batch_size=4)
    config.data.image_size = config.augment.image_size = 8
    with tfds.testing.mock_data(num_examples=12):
        n = data.dataset_info(config).num_train_examples  # stl10: unlabelled + train = 24
        steps = n // 4  # one epoch of the two hosts' equal shares, 2 rows a step each
        seen = []
        for p in (0, 1):
            it = data.pretrain_iterator(config, process_index=p, process_count=2, with_index=True)
            seen.append(np.concatenate([next(it)["index"] for _ in range(steps)]))
        resumed = data.pretrain_iterator(
            config, process_index=1, process_count=2, start_step=steps - 1, with_index=True
        )
        last = next(resumed)["index"]
    assert n == (24 if dataset == "stl10" else 12)
    assert sorted(np.concatenate(seen).tolist()) == list(range(n))  # each example once
    for step in range(steps):  # hosts 0 and 1: the two halves of each global batch
        rows = np.concatenate([seen[p][2 * step : 2 * step + 2] for p in (0, 1)])
        np.testing.assert_array_equal(rows, streams.batch_indices(config.seed, n, 4, step))
    np.testing.assert_array_equal(last, seen[1][-2:])
