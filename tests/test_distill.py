"""`--mode=distill`: SimCLR v2's distillation of a fine-tuned teacher into a student, on the digits.

The loss against numpy; the teacher frozen and the sharded step equal to one device's; a run
killed and resumed equal to the uninterrupted one; an imported official-layout teacher distils;
bad teachers and students refused at start in one line, the workdir untouched.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config
from tolerances import assert_trees_close, fp32_atol, fp32_rtol

from simclr_jax import checkpoint, data, models, modes
from simclr_jax.data import labelled
from simclr_jax.evals import classifier, distill, distill_cache, finetune
from simclr_jax.evals.classifier import ClassifierState
from simclr_jax.evals.distill_teacher import load_teacher, teacher_shardings
from simclr_jax.runtime import parallel


def _export_of_a_random_encoder(path: str, num_classes: int = 0) -> str:
    """A tiny pretraining-style export (encoder + head), with a linear head if `num_classes`.

    Drawn in numpy on the model's shapes (He-scaled kernels, unit BN): no compile.
    """
    c = tiny_config()
    model = models.create_model(c, max(num_classes, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(1)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(s.dtype)
        return (np.ones if "scale" in name or "var" in name else np.zeros)(s.shape, s.dtype)

    v = jax.tree_util.tree_map_with_path(draw, shapes)
    parts = ("encoder", "head", "linear_head") if num_classes else ("encoder", "head")
    variables = {
        "params": {p: v["params"][p] for p in parts},
        "batch_stats": {p: v["batch_stats"][p] for p in ("encoder", "head")},
    }
    model = {**c.model.to_dict(), "head_out_scale": True}
    return checkpoint.export_encoder(path, variables, model, {"workdir": path})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished tiny fine-tune run (10% of the labels, from head layer 1): the teacher."""
    root = tmp_path_factory.mktemp("teacher")
    c = tiny_config(init_from=_export_of_a_random_encoder(str(root / "export")))
    f = c.finetune
    f.epochs, f.batch_size, f.label_fraction, f.from_head_layer = 1.0, 64, 0.1, 1  # 2 steps
    f.optimizer, f.lr_scaling, f.base_lr = "sgd", "none", 0.1
    c.eval.batch_size = 96
    finetune.finetune(c, str(root / "ft"))
    return str(root / "ft")


def _config(teacher_path, **section):
    c = tiny_config()
    c.distill.teacher = teacher_path
    d = c.distill
    d.epochs, d.batch_size, d.warmup_epochs = 1.0, 128, 0.0  # 11 steps of the 1437 digits
    d.optimizer, d.lr_scaling, d.base_lr, d.weight_decay = "sgd", "none", 0.05, 1e-4
    c.eval.batch_size = 96  # 360 test digits: the last batch is padded
    c.log_every_steps, c.checkpoint_every_steps = 4, 5
    for k, v in section.items():
        d[k] = v
    return c


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message


def test_loss_equals_the_papers_cross_entropy_in_numpy():
    rng = np.random.default_rng(0)
    s, t, s_l = (rng.normal(0, 3, (6, 10)).astype(np.float32) for _ in range(3))
    labels = rng.integers(0, 10, 6)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for temperature in (0.1, 1.0, 4.0):
        want = -np.mean(np.sum(softmax(t / temperature) * np.log(softmax(s / temperature)), -1))
        got, parts = distill.distill_loss(s, t, temperature)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert set(parts) == {"distill_loss"}
        supervised = -np.mean(np.log(softmax(s_l)[np.arange(6), labels]))
        got, parts = distill.distill_loss(s, t, temperature, s_l, labels, 0.3)
        np.testing.assert_allclose(got, 0.7 * want + 0.3 * supervised, rtol=1e-5)
        np.testing.assert_allclose(parts["label_loss"], supervised, rtol=1e-5)
    # The teacher's targets carry no gradient into it; the student's is softmax(s/T) - p_t, / T.
    grad = jax.grad(lambda z: distill.distill_loss(z, t, 0.5)[0])(s)
    np.testing.assert_allclose(grad, (softmax(s / 0.5) - softmax(t / 0.5)) / 0.5 / 6, atol=1e-6)


def _hand_run(config, devices, steps):
    """`steps` distillation steps on `devices`: host copies of the states, metrics, the teacher."""
    mesh = parallel.make_mesh(devices)
    t = load_teacher(config, 10)
    student = distill.build_student(config, t)
    z = distill.batch_sizes(config, mesh)
    params, stats = student.variables["params"], student.variables["batch_stats"]
    tx, schedule = classifier.make_optimizer(
        config.distill, params, z["batch"], z["total"], z["spe"], 1e-3
    )
    rep = parallel.replicated(mesh)
    state = jax.device_put(
        ClassifierState(jnp.zeros((), jnp.int32), params, stats, tx.init(params)), rep
    )
    placement = teacher_shardings(config, t, mesh)
    teacher_vars = jax.device_put(t.variables, placement or rep)
    step = distill.jitted_step(config, student, t, tx, schedule, mesh, placement)
    batches = distill.host_batches(config, z["batch"], z["label_batch"], 0)
    states, metrics = [jax.device_get(state)], []
    for _ in range(steps):
        state, m = step(state, teacher_vars, parallel.host_to_global(next(batches), mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    batches.close()
    return states, metrics, t, teacher_vars


def test_sharded_step_equals_one_device_and_the_teacher_stays_frozen(teacher):
    # The run's config: the 8-device step compiles here and the next test's runs reuse it.
    config = _config(teacher)
    s1, m1, t, after1 = _hand_run(config, jax.devices()[:1], 2)
    s8, m8, _, after8 = _hand_run(config, jax.devices(), 2)
    for after in (after1, after8):  # passed to every step, never changed (nor donated)
        after = jax.device_get(after)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(t.variables), strict=True):
            np.testing.assert_array_equal(a, b)
    assert set(t.variables["params"]) == {"encoder", "head", "classifier"}  # head layer 1
    # The longest sum: a BN statistic over 128 images x 8 x 8; 17 conv + BN layers of 3
    # reductions, the classifier and the loss, forward and backward (tests/tolerances.py).
    n, depth = 128 * 8 * 8, 3 * 17 + 2
    for a, b in zip(m8, m1, strict=True):
        for key in ("loss", "distill_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=fp32_rtol(n, depth), err_msg=key)
    assert_trees_close(s8[1], s1[1], before=s1[0], reduction_len=n, depth=2 * depth)
    assert_trees_close(s8[2], s1[2], before=s1[1], reduction_len=n, depth=4 * depth)
    assert m1[0]["distill_loss"] > 0 and 0 <= m1[0]["agreement"] <= 1


class Killed(Exception):
    pass


def test_run_resumes_after_a_kill_to_the_uninterrupted_result(teacher, tmp_path, monkeypatch):
    config = _config(teacher)
    full = modes.run("distill", config, str(tmp_path / "full"), False)
    assert full["steps"] == 11 and full["num_images"] == 1437 and full["teacher_kind"] == "finetune"
    # The teacher's figures are the fine-tune run's own: the same network, read back.
    tuned = json.load(open(os.path.join(teacher, "finetune.json")))
    assert (full["teacher_top1"], full["teacher_top5"]) == (tuned["top1"], tuned["top5"])
    saved = json.load(open(tmp_path / "full" / "distill.json"))
    assert {"top1", "top5", "teacher_top1", "teacher_top5", "teacher", "config"} <= set(saved)
    assert saved["teacher"] == teacher and saved["teacher_head_layer"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 11]
    # The student's export: encoder + classifier, readable by the other modes and as a teacher.
    variables, meta = checkpoint.load_export(full["export"])
    assert set(variables["params"]) == {"encoder", "linear_head"}
    assert meta["source"]["supervised_head"] == {"num_classes": 10, "input": "features"}

    workdir = str(tmp_path / "killed")
    real = labelled.labelled_train_iterator

    def dying(*args, **kwargs):  # like SIGKILL after 8 batches: the checkpoint of step 5 stays
        it = real(*args, **kwargs)
        for _ in range(8):
            yield next(it)
        raise Killed

    monkeypatch.setattr(labelled, "labelled_train_iterator", dying)
    with pytest.raises(Killed):
        distill.distill(config, workdir)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["5"]
    monkeypatch.undo()
    resumed = distill.distill(config, workdir)
    assert (resumed["top1"], resumed["top5"]) == (full["top1"], full["top5"])
    for a, b in zip(
        jax.tree.leaves(resumed["variables"]), jax.tree.leaves(full["variables"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    changed = _config(teacher, temperature=1.0)
    with pytest.raises(ValueError, match="distill.temperature: 0.1 -> 1.0"):
        distill.distill(changed, workdir)


def test_sharded_teacher_step_equals_the_replicated_one(teacher):
    # distill.shard_teacher='sharded' on 8 devices: each stores 1/8 of the teacher's large leaves.
    s_rep, m_rep, _, _ = _hand_run(_config(teacher), jax.devices(), 2)  # compiled above
    s_fsdp, m_fsdp, t, placed = _hand_run(
        _config(teacher, shard_teacher="sharded"), jax.devices(), 2
    )
    kernel = placed["params"]["encoder"]["stage4_block2"]["conv2"]["kernel"]  # [3, 3, 32, 32]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "data")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 32, 4)
    sharded = [
        x for x in jax.tree.leaves(placed) if x.sharding.spec != jax.sharding.PartitionSpec()
    ]
    assert len(sharded) >= len(jax.tree.leaves(placed)) // 3  # kernels and >= 8-channel BNs
    # The gathered weights are the replicated ones; XLA may split the teacher's convolutions
    # differently, so its logits, and the student's steps, agree to the float32 rounding of the
    # teacher's forward added to the step's (the 8 vs 1 device bounds above).
    n, depth = 128 * 8 * 8, 3 * 17 + 2
    for a, b in zip(m_fsdp, m_rep, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=fp32_rtol(n, 2 * depth))
    assert_trees_close(s_fsdp[1], s_rep[1], before=s_rep[0], reduction_len=n, depth=3 * depth)
    assert_trees_close(s_fsdp[2], s_rep[2], before=s_rep[1], reduction_len=n, depth=5 * depth)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(placed)), jax.tree.leaves(t.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # frozen, sharded or not


def test_cached_teacher_run_equals_the_forward_and_a_resume_reuses_the_cache(
    teacher, tmp_path, monkeypatch
):
    # Without augmentation the teacher's logits of an image never change: cached or computed in
    # the step, the student learns the same targets (15 chunks of 96 images for 1437 digits).
    forward = distill.distill(_config(teacher, augment=False), str(tmp_path / "forward"))
    config = _config(teacher, augment=False, cache_teacher=True)
    workdir = str(tmp_path / "cached")
    write, written = distill_cache._write_chunk, []

    def killed_after_three(root, first, chunk):  # like SIGKILL in the cache pass
        if len(written) == 3:
            raise Killed
        write(root, first, chunk)
        written.append(first)

    monkeypatch.setattr(distill_cache, "_write_chunk", killed_after_three)
    with pytest.raises(Killed):
        distill.distill(config, workdir)
    cache = distill_cache.cache_dir(workdir)
    assert sorted(os.listdir(cache)) == ["cache.json"] + [f"logits_{i:010d}.npy" for i in written]
    # Rerun: the pass forwards only the images no chunk holds; then training dies at batch 8.
    written.clear()
    monkeypatch.setattr(distill_cache, "_write_chunk", lambda *a: written.append(a[1]) or write(*a))
    real = labelled.labelled_train_iterator

    def dying(*args, **kwargs):
        it = real(*args, **kwargs)
        for _ in range(8):
            yield next(it)
        raise Killed

    monkeypatch.setattr(labelled, "labelled_train_iterator", dying)
    with pytest.raises(Killed):
        distill.distill(config, workdir)
    assert written == list(range(288, 1437, 96))
    assert json.load(open(os.path.join(cache, "cache.json")))["complete"] is True
    monkeypatch.undo()

    def no_teacher(*args):
        raise AssertionError("the resumed run recomputed the cache")

    monkeypatch.setattr(distill_cache, "_forward", no_teacher)
    resumed = distill.distill(config, workdir)
    # The cache holds image i's logits at row i: the teacher's on the train digits in order.
    t = load_teacher(config, 10)
    mesh = parallel.make_mesh()
    cached = distill_cache.teacher_cache(config, workdir, t, {}, None, mesh)  # read, not run
    images = data.eval_arrays(config, "train")[0].astype(np.float32) / 255.0
    want = jax.jit(lambda v, x: t.model.apply(v, x, train=False))(t.variables, images)
    # Inference: the longest sum is a 3 x 3 x 32 convolution; 17 of them, the head, classifier.
    np.testing.assert_allclose(cached, want, rtol=0, atol=fp32_atol(want, 9 * 32, 20))
    # The runs learn the same targets: their losses and students agree to the rounding of
    # 11 steps of forward and backward (the teacher's rows come from other batches).
    n, depth = 128 * 8 * 8, 11 * 2 * (3 * 17 + 2)

    def losses(name):  # by step: the resumed run logs steps 8 and 11 again
        rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        return {r["step"]: r["distill_loss"] for r in rows if "loss" in r}

    assert losses("cached").keys() == losses("forward").keys() == {4, 8, 11}
    for step, loss in losses("forward").items():
        np.testing.assert_allclose(losses("cached")[step], loss, rtol=fp32_rtol(n, depth))
    assert (resumed["top1"], resumed["top5"]) == (forward["top1"], forward["top5"])
    assert_trees_close(resumed["variables"], forward["variables"], reduction_len=n, depth=depth)


def test_an_imported_official_teacher_distils(tmp_path):
    ref = pytest.importorskip("simclr_tf_reference")
    official = ref.Model(18, 4, 0.0, head_layers=3, out_dim=8, num_classes=10, seed=3,
                         cifar_stem=True)  # fmt: skip
    prefix = ref.save_tf2(official, str(tmp_path / "tf"))
    c = tiny_config(init_from=prefix)
    modes.run("import_official", c, str(tmp_path / "imported"), False)
    # Its export/, with the paper's labelled variant: 3 steps on images + 10% of the labels.
    config = _config(str(tmp_path / "imported"), epochs=0.3, label_weight=0.5)
    config.finetune.label_fraction = 0.1
    result = distill.distill(config, str(tmp_path / "student"))
    assert result["teacher_kind"] == "export" and result["steps"] == 3
    assert result["num_labels"] == 142 and result["label_weight"] == 0.5
    rows = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl")]
    assert all(np.isfinite(r["label_loss"]) for r in rows if "loss" in r)
    assert result["student"]["compat"] == "simclr_tf"  # self-distillation: the teacher's layout
    # The teacher's top-1 is the TF model's on the same eval images.
    batches, n = labelled.eval_batches(config, "test", 360)
    hits = 0
    for _ in range(n):
        b = next(batches)
        logits = official(b["image"].astype(np.float32) / 255.0)["logits"]
        hits += int(np.sum((logits.argmax(-1) == b["label"]) & b["mask"]))
    assert abs(result["teacher_top1"] - hits / 360) <= 1 / 360  # a near-tie may flip one image


def test_bad_teachers_and_students_are_refused_at_start(teacher, tmp_path):
    workdir = str(tmp_path / "run")

    def refused(config, *words):
        with pytest.raises((ValueError, checkpoint.CheckpointError)) as e:
            distill.distill(config, workdir)
        _one_line(e, *words)
        assert not os.path.exists(workdir)  # nothing written

    refused(_config(""), "--config.distill.teacher")
    # A cache holds one view per image: with crops the teacher must see the student's.
    refused(_config(teacher, cache_teacher=True), "distill.cache_teacher=True", "augment=False")
    no_head = _export_of_a_random_encoder(str(tmp_path / "pretrained"))
    refused(_config(no_head), no_head, "no classifier head")
    five = _export_of_a_random_encoder(str(tmp_path / "five"), num_classes=5)
    refused(_config(five), five, "5 classes", "'digits' has 10")
    small = _config(teacher, student="model")
    small.model.stem = "imagenet"  # downsamples by 32: an 8 px digit ends below one pixel
    refused(small, "student", "does not fit the 8 px input")
    refused(_config(teacher, teacher_head_layer=0), teacher, "head layer 1")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "job.json").write_text('{"job": "finetune"}')
    refused(_config(str(unfinished)), str(unfinished), "has not finished")
    refused(_config(str(tmp_path)), "neither an export")
