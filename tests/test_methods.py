"""The method registry, and the objectives without negatives: BYOL and SimSiam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import model_and_optimizer, tiny_config
from tolerances import assert_trees_close, fp32_rtol

from simclr_jax import checkpoint, config_base, data, losses, methods, modes
from simclr_jax.evals import classifier
from simclr_jax.methods import base, byol
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.pretrain import train
from simclr_jax.runtime import parallel

STEPS = {"byol": 4, "simsiam": 40}  # SimSiam's run is long enough to show (non-)collapse
VIEW_PIXELS = 2 * 32 * 8 * 8  # 2 views x batch 32 x 8 x 8 px: the step's longest reduction


def _config(method, **overrides):
    c = tiny_config(
        method=method, total_steps=STEPS[method], log_every_steps=1, checkpoint_every_steps=2
    )
    c.monitor_every_steps = 2
    c.eval.at_end = False
    if method == "byol":
        c.byol.predictor_hidden_dim = 16
        c.byol.base_momentum = 0.9  # far from 1: the EMA visibly moves the target
    if method == "simsiam":
        c.simsiam.predictor_hidden_dim = 8
        # A high LR: without the stop-gradient the collapse then shows within 40 steps.
        c.optim.name, c.optim.base_lr, c.optim.weight_decay = "sgd", 0.5, 1e-4
        c.optim.constant_lr_params = ("predictor",)
    for k, v in overrides.items():
        c[k] = v
    return c


def _hand_run(config, devices, steps):
    """`steps` steps on `devices`; host copies of every state (the step donates its input)."""
    mesh = parallel.make_mesh(devices)
    model, tx, schedule = model_and_optimizer(config)
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    step_fn = pretrain_state.compile_train_step(config, model, tx, schedule, mesh)
    it = data.pretrain_iterator(config)
    states, metrics = [jax.device_get(state)], []
    for _ in range(steps):
        state, m = step_fn(state, parallel.host_to_global(next(it), mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics, step_fn


def assert_steps_agree(run1, run8, keys, steps=1):
    """The first `steps` metrics (`keys`) and the state after step 1 of a 1- and an 8-device run.

    After one step the states agree to the rounding of one forward + backward pass, whose
    longest sums (weight gradients, BN statistics) run over every view's pixels.
    """
    (states1, metrics1), (states8, metrics8) = run1, run8
    for k in range(steps):
        for key in keys:
            np.testing.assert_allclose(
                metrics8[k][key], metrics1[k][key], rtol=fp32_rtol(VIEW_PIXELS, 40), err_msg=key
            )
    assert_trees_close(
        states1[1].params,
        states8[1].params,
        reduction_len=VIEW_PIXELS,
        depth=40,
        before=states8[0].params,
    )


@pytest.fixture(scope="module")
def byol_run():
    config = _config("byol")
    return config, _hand_run(config, jax.devices(), config.total_steps)


@pytest.fixture(scope="module")
def simsiam_run():
    config = _config("simsiam")
    return config, _hand_run(config, jax.devices(), config.total_steps)


@pytest.fixture(params=["byol", "simsiam"])
def run(request):
    """Each method's hand-run steps on 8 devices (compiled once per module)."""
    return request.getfixturevalue(f"{request.param}_run")


def test_registry_lists_every_method_and_refuses_an_unknown_one():
    assert {"simclr", "moco", "byol", "simsiam"} <= set(methods.names())
    config = tiny_config(method="swav")
    with pytest.raises(config_base.ConfigError, match=r"method='swav'.*'byol'.*'simclr'"):
        config_base.validate_config(config)
    for name in methods.names():  # every config file's method section is in the base config
        section = methods.get(name).config_defaults
        assert section is None or name in config_base.base_config()


def test_byol_and_simsiam_losses_match_numpy():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.normal(size=(6, 5)) for _ in range(4))

    def cos(a, b):
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    want_byol = np.mean(4 - 2 * cos(p1, z2) - 2 * cos(p2, z1))
    want_simsiam = np.mean(-0.5 * (cos(p1, z2) + cos(p2, z1)))
    args = [jnp.asarray(a, jnp.float32) for a in (p1, p2, z1, z2)]
    np.testing.assert_allclose(losses.byol_loss(*args), want_byol, rtol=fp32_rtol(5, 4))
    np.testing.assert_allclose(losses.simsiam_loss(*args), want_simsiam, rtol=fp32_rtol(5, 4))
    # Targets get no gradient; with stop_gradient=False SimSiam's projections do.
    g = jax.grad(lambda z: losses.byol_loss(args[0], args[1], z, args[3]))(args[2])
    assert float(jnp.max(jnp.abs(g))) == 0.0
    g = jax.grad(lambda z: losses.simsiam_loss(args[0], args[1], z, args[3], stop_gradient=False))
    assert float(jnp.max(jnp.abs(g(args[2])))) > 0.0


def test_ema_and_byol_cosine_schedule_by_hand():
    tree = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    online = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
    out = base.ema(tree, online, jnp.float32(0.75))
    np.testing.assert_allclose(out["a"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"]["c"], 3.0)
    # BYOL: tau_k = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2.
    at = [float(base.cosine_momentum(0.996, True, jnp.int32(k), 100, "x")) for k in (0, 50, 100)]
    np.testing.assert_allclose(at, [0.996, 0.998, 1.0], rtol=1e-6)
    # The run-length rule: 0.99 for a 400-step digits run, the paper's values on long runs.
    assert base.auto_momentum(400, 0.99, 0.996) == pytest.approx(0.99)
    assert base.auto_momentum(500_000, 0.99, 0.996) == pytest.approx(0.996)
    config = _config("byol")
    config.byol.base_momentum = 0.999
    (warning,) = [w for w in byol.resolve(config, 400, 1437) if w.startswith("WARNING")]
    assert "byol.base_momentum=0.999" in warning and "--config.byol.base_momentum=0.99" in warning


def test_step_updates_the_target_by_ema_and_metrics_are_finite(run):
    config, (states, metrics, step_fn) = run
    assert step_fn._cache_size() == 1
    for m in metrics:
        for key in ("loss", "linear_loss", "linear_acc", "lr", "grad_norm"):
            assert np.isfinite(m[key]), key
    # monitor_every_steps=2: computed on even steps only (zeros otherwise).
    assert [float(m["rankme"]) > 1.0 for m in metrics] == [k % 2 == 1 for k in range(len(metrics))]
    if config.method == "byol":
        # The target after step k is tau_k * target + (1 - tau_k) * online params after step k.
        for k in range(config.total_steps):
            tau = float(metrics[k]["ema_momentum"])
            want = base.ema(states[k].method_state["target_params"], states[k + 1].params, tau)
            assert_trees_close(
                states[k + 1].method_state["target_params"], want, reduction_len=2, depth=1
            )
        assert float(metrics[0]["ema_momentum"]) == pytest.approx(0.9)
        assert 0.0 <= float(metrics[0]["loss"]) <= 8.0
    else:
        assert states[0].method_state is None
        assert -1.0 <= float(metrics[0]["loss"]) <= 1.0
        # The predictor keeps the peak LR while the rest follows the warm-up schedule.
        pred = np.abs(states[1].params["predictor"]["dense2"]["kernel"])
        assert (
            float(metrics[0]["lr"]) == 0.0
            and np.max(np.abs(pred - states[0].params["predictor"]["dense2"]["kernel"])) > 0.0
        )
        np.testing.assert_array_equal(
            states[1].params["encoder"]["stem_conv"]["kernel"],
            states[0].params["encoder"]["stem_conv"]["kernel"],
        )


def test_sharded_steps_equal_the_single_device_steps(run):
    config, (states8, metrics8, _) = run
    states1, metrics1, _ = _hand_run(config, jax.devices()[:1], 2)
    assert_steps_agree(
        (states1, metrics1), (states8, metrics8), ("loss", "linear_loss", "grad_norm"), steps=2
    )


def test_resume_is_bit_exact(run, tmp_path):
    """The loop resumed from the step-2 state (method state included) ends on the hand-run bits."""
    config, (states, _, _) = run
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh()
    manager = checkpoint.create_manager(workdir)
    state2 = jax.device_put(states[2], parallel.replicated(mesh))
    checkpoint.save(manager, 2, state2, {"step": 2, "data_step": 2})
    manager.wait_until_finished()
    manager.close()
    final = jax.device_get(modes.pretrain(config, workdir)["state"])
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(states[-1]), strict=True):
        np.testing.assert_array_equal(a, b)


def _monitors(metrics):
    return [(float(m["rankme"]), float(m["uniform"])) for m in metrics[1::2]]


def test_simsiam_without_stop_gradient_collapses(simsiam_run):
    """Chen & He's Fig. 2 in 40 steps: no stop-gradient, and rankme and uniformity collapse."""
    config, (_, metrics, _) = simsiam_run
    collapsing = config.copy_and_resolve_references()
    collapsing.simsiam.stop_gradient = False
    _, collapsed, _ = _hand_run(collapsing, jax.devices(), collapsing.total_steps)
    (rank0, _), *_, (rank_sg, uniform_sg) = _monitors(metrics)
    *_, (rank_no_sg, uniform_no_sg) = _monitors(collapsed)
    # Predictions come to match their own projections: the loss heads to -1, far below the
    # real method's at the same step (about -0.3).
    assert float(collapsed[-1]["loss"]) < min(-0.6, float(metrics[-1]["loss"]) - 0.25)
    assert uniform_no_sg > -0.5 and uniform_sg < -1.5  # 0: every embedding at one point
    assert rank_no_sg < 0.6 * rank0 and rank_no_sg < 0.75 * rank_sg


def test_simsiam_head_ends_in_an_affine_free_bn_that_exports_and_fine_tunes(simsiam_run, tmp_path):
    """The projector's last BN has no parameters; the export says so, so fine-tuning from the
    last head layer (the whole head) builds the same architecture and loads every leaf."""
    config, (states, _, _) = simsiam_run
    last = f"bn{config.model.head_layers}"
    assert last not in states[-1].params["head"] and last in states[-1].batch_stats["head"]
    assert "scale" in states[-1].params["head"]["bn1"]  # the hidden layers keep theirs
    export = train.export_run(config, states[-1], str(tmp_path / "run"))
    _, meta = checkpoint.load_export(export)
    assert meta["model"]["head_out_scale"] is False
    ft = config.copy_and_resolve_references()
    ft.init_from = export
    source = classifier.load_source(ft, "finetune")
    model = classifier.build_classifier(
        source.model_config, config.model.head_layers, 10, freeze=False
    )
    variables = classifier.initial_variables(model, source, config.augment.image_size)
    np.testing.assert_array_equal(
        variables["batch_stats"]["head"][last]["var"], states[-1].batch_stats["head"][last]["var"]
    )


def test_simsiam_warns_off_its_optimizer_and_names_the_flags():
    simsiam = methods.get("simsiam")
    paper = _config("simsiam")
    assert simsiam.resolve(paper, 400, 1437) == []
    adamw = tiny_config(method="simsiam")
    adamw.optim.name = "adamw"  # the SimCLR digits default's optimizer, no fixed-LR predictor
    (line,) = simsiam.resolve(adamw, 400, 1437)
    assert line.startswith("WARNING: SimSiam with optim.name='adamw'")
    assert "--config.optim.name=sgd" in line and "constant_lr_params" in line
