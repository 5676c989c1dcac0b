"""`--mode=distill`: SimCLR v2's third step, a student learning a fine-tuned teacher's predictions.

The student (the teacher's encoder by default, "self-distillation"; `distill.student='model'`:
`config.model`, e.g. a smaller one; from scratch, or from the export `config.init_from`) plus a
linear classifier learns, on the unlabelled train images (the whole train split, labels never
read), the cross-entropy between the teacher's `softmax(t / T)` and its own `softmax(s / T)`
(the paper's equation 2), optionally mixed with the cross-entropy on `finetune`'s labelled subset
(equation 3). Both networks see the same device crop + flip of each image; the teacher
(`distill_teacher`) runs in inference mode inside the same jitted step, its variables replicated
or, when large, sharded over the devices (`distill.shard_teacher`), passed as an argument and
never updated. The run is the run loop's: checkpoints with the data
position, bit-exact resume, health checks, preemption, metrics. At the end: the student's and the
teacher's top-1 / top-5 on the whole eval split in `WORKDIR/distill.json`, and the student
exported to `WORKDIR/export/` (its classifier as `params['linear_head']`, so it can teach too).
Teacher predictions are computed on the fly, or with `distill.cache_teacher` (and no
augmentation) once per image into the workdir and read by the step (`distill_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment, checkpoint, config_base, data, models
from simclr_jax.data import labelled, streams
from simclr_jax.evals import classifier, classifier_run, distill_cache, finetune
from simclr_jax.evals.classifier import Classifier, ClassifierState
from simclr_jax.evals.distill_teacher import Teacher, check_fits, load_teacher, teacher_shardings
from simclr_jax.runtime import compiled, keys, loop, parallel
from simclr_jax.runtime.metric_writer import MetricWriter

log = logging.getLogger(__name__)

JOB = "distill"


def distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float,
    labelled_logits: jax.Array | None = None,
    labels: jax.Array | None = None,
    label_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLR v2's loss: `(1 - w) CE(softmax(t/T), softmax(s/T)) + w CE(labels, softmax(s_l))`.

    The paper's equations 2 and 3 (alpha = 1 - w), means over the batch. No T^2 factor (the
    official colab's, after Hinton et al.): the paper has none, and LARS's trust ratio makes the
    gradient's scale moot.
    """
    targets = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature)
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    distill = -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
    if labels is None:
        return distill, {"distill_loss": distill}
    supervised = optax.softmax_cross_entropy_with_integer_labels(
        labelled_logits.astype(jnp.float32), labels
    ).mean()
    loss = (1.0 - label_weight) * distill + label_weight * supervised
    return loss, {"distill_loss": distill, "label_loss": supervised}


def distill_train_step(
    state: ClassifierState,
    teacher_variables: Any,
    batch: dict[str, jax.Array],
    *,
    student: Classifier,
    teacher: Classifier,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    aug_cfg: Any,
    seed: int,
    temperature: float,
    label_weight: float,
) -> tuple[ClassifierState, dict[str, jax.Array]]:
    """One student update on a crop + flip view that teacher and student both see; global BN.

    With `batch['teacher_logits']` (a cache, for un-augmented views) the teacher does not run.
    """
    # The downstream jobs' step keys: crops depend on (seed, step) only, so a resume redraws them.
    key = jax.random.fold_in(keys.derive(seed, keys.CLASSIFIER_STEPS), state.step)
    x = augment.views(key, batch["image"], aug_cfg, num_views=1)[0]
    if "teacher_logits" in batch:
        teacher_logits = batch["teacher_logits"]
    else:
        teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, x, train=False))
    n = x.shape[0]
    if label_weight:
        labelled_key = jax.random.fold_in(key, 1)
        x_l = augment.views(labelled_key, batch["label_image"], aug_cfg, num_views=1)[0]
        x = jnp.concatenate([x, x_l])  # one forward: BN statistics over both batches

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, new = student.apply(variables, x, train=True, mutable=["batch_stats"])
        loss, parts = distill_loss(
            logits[:n],
            teacher_logits,
            temperature,
            logits[n:] if label_weight else None,
            batch["label"] if label_weight else None,
            label_weight,
        )
        return loss, (logits[:n], parts, new.get("batch_stats", {}))  # a ViT: none

    (loss, (logits, parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
    agree = jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
    return new, {
        "loss": loss,
        **parts,
        "agreement": jnp.mean(agree),  # the student's top-1 = the teacher's, on train images
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
    }


@dataclasses.dataclass(frozen=True)
class Student:
    """The network trained: its architecture, starting variables and their origin."""

    model: Classifier
    model_config: ml_collections.ConfigDict
    variables: dict[str, Any]
    init: str  # the export it starts from, or 'scratch'


def build_student(config: ml_collections.ConfigDict, teacher: Teacher) -> Student:
    """The student: `init_from`'s encoder, else the teacher's or `config.model`'s, from scratch."""
    size = config.augment.image_size
    if config.init_from:
        source = classifier.load_source(config, JOB)
        model_config = source.model_config
        classifier.report_overrides(config, source)
    elif config.distill.student == "teacher":
        model_config = teacher.model_config.copy_and_resolve_references()
    else:
        model_config = config.model.copy_and_resolve_references()
    model_config.dtype = config.model.dtype
    check_fits(model_config, size, f"the student (distill.student={config.distill.student!r})")
    model = classifier.build_classifier(model_config, 0, teacher.num_classes, freeze=False)
    if config.init_from:
        variables = classifier.initial_variables(model, source, size)
        return Student(model, model_config, variables, os.path.abspath(config.init_from))
    init_key = keys.derive(config.seed, keys.INIT_PARAMS)
    variables = compiled.jit_init(
        lambda: model.init(init_key, jnp.zeros((1, size, size, 3), jnp.float32), False)
    )()
    return Student(model, model_config, jax.device_get(dict(variables)), "scratch")


def jitted_step(
    config: ml_collections.ConfigDict,
    student: Student,
    teacher: Teacher,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Any,
    teacher_placement: Any = None,
) -> Any:
    """The distillation step jitted over `mesh`: state donated, batch split, teacher replicated
    or as `teacher_placement` (its variables' shardings) says."""
    step = functools.partial(
        distill_train_step,
        student=student.model,
        teacher=teacher.model,
        tx=tx,
        schedule=schedule,
        aug_cfg=classifier.train_augment_config(config, bool(config.distill.augment)),
        seed=config.seed,
        temperature=float(config.distill.temperature),
        label_weight=float(config.distill.label_weight),
    )
    return classifier_run.jit_step(step, mesh, teacher_placement)


def host_batches(
    config: ml_collections.ConfigDict,
    batch: int,
    label_batch: int,
    start: int,
    cache: np.ndarray | None = None,
) -> streams.Joined:
    """This host's `{'image'}` train batches (labels dropped), plus the labelled subset's.

    With `cache` (the teacher's logits [N, C] by example) they carry 'teacher_logits' too. The
    two streams' skipped files count as one stream's (several processes agree on them).
    """
    aug = bool(config.distill.augment)
    images = labelled.labelled_train_iterator(
        config, batch, augment=aug, seed=config.seed, start_step=start, with_index=cache is not None
    )

    def unlabelled(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # labels never sent
        cached = {} if cache is None else {"teacher_logits": cache[b["index"]]}
        return {"image": b["image"], **cached}

    if not label_batch:
        return streams.Joined([images], unlabelled)
    keep, subset = finetune.selection(config)
    labels = labelled.labelled_train_iterator(
        config, label_batch, keep=keep, subset=subset, augment=aug, seed=config.seed,
        start_step=start,
    )  # fmt: skip

    def both(b: dict[str, np.ndarray], lb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**unlabelled(b), "label_image": lb["image"], "label": lb["label"]}

    return streams.Joined([images, labels], both)


def batch_sizes(config: ml_collections.ConfigDict, mesh: Any) -> dict[str, int]:
    """Train images, labelled examples, global batches, steps per epoch and steps of the run."""
    sec = config.distill
    labelled.labelled_size(config, "test")  # refuses a dataset without labels before writing
    n = labelled.labelled_size(config, "train")
    batch = classifier.global_batch(sec.batch_size, mesh, n)
    num_labels = label_batch = 0
    if sec.label_weight:
        keep, subset = finetune.selection(config)
        num_labels = labelled.labelled_size(config, "train", keep=keep, subset=subset)
        label_batch = classifier.global_batch(sec.batch_size, mesh, num_labels)
    for have, need in ((n, batch), (num_labels, label_batch)):
        if need > have:
            raise ValueError(f"{have} examples are fewer than the {need} devices.")
    spe = max(n // batch, 1)
    total = max(int(round(sec.epochs * spe)), 1)
    return {
        "num_images": n,
        "num_labels": num_labels,
        "batch": batch,
        "label_batch": label_batch,
        "spe": spe,
        "total": total,
    }


def _export_student(
    config: ml_collections.ConfigDict,
    workdir: str,
    student: Student,
    variables: Any,
    info: dict[str, Any],
) -> str:
    """The student in the export format: encoder + `linear_head` (it can teach in turn)."""
    params, stats = jax.device_get((variables["params"], variables["batch_stats"]))
    exported = {
        "params": {"encoder": params["encoder"], "linear_head": {"dense": params["classifier"]}},
        "batch_stats": {"encoder": stats.get("encoder", {})},
    }
    head = {"num_classes": int(params["classifier"]["kernel"].shape[-1]), "input": "features"}
    source = {"workdir": os.path.abspath(workdir), "job": JOB, "supervised_head": head, **info}
    source["config"] = config.to_dict()
    path = checkpoint.export_dir(workdir)
    # The student has no projection head; the key is stated as every export states it.
    described = models.describe_encoder(student.model_config, params["encoder"])
    model = {"head_out_scale": True, **described}
    return checkpoint.export_encoder(path, exported, model, source)


def distill(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> dict[str, Any]:
    """Distils `config.distill.teacher` into a student; writes `distill.json` and `export/`.

    Returns the result: `top1`, `top5`, `teacher_top1`, `teacher_top5`, `steps`, `history`, ...
    """
    config_base.validate_config(config)
    if data.modality(config.dataset) != "image":
        raise ValueError(
            f"--mode=distill distils image classifiers; config.dataset={config.dataset!r} is "
            "text (text encoders: --mode=linear_eval or --mode=finetune)"
        )
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    teacher = load_teacher(config, data.dataset_info(config).num_classes)
    student = build_student(config, teacher)
    sec, z = config.distill, batch_sizes(config, mesh)
    params, stats = student.variables["params"], student.variables.get("batch_stats", {})
    tx, schedule = classifier.make_optimizer(
        sec, params, z["batch"], z["total"], z["spe"], config.optim.trust_coefficient
    )

    def init() -> ClassifierState:
        return ClassifierState(jnp.zeros((), jnp.int32), params, stats, tx.init(params))

    state, start, manager = classifier_run.open_run(
        config, workdir, JOB, allow_config_change, init, mesh, z["total"]
    )
    placement = teacher_shardings(config, teacher, mesh)
    teacher_vars = jax.device_put(teacher.variables, placement or parallel.replicated(mesh))
    # The teacher's figures first: a wrong head layer or a poor teacher shows before the run.
    taught = classifier.evaluate_classifier(
        config, teacher.model, teacher_vars, mesh, variables_shardings=placement
    )
    cache = None
    if sec.cache_teacher:  # then the step reads the cache and the teacher leaves the devices
        cache = distill_cache.teacher_cache(config, workdir, teacher, teacher_vars, placement, mesh)
        teacher_vars, placement = {}, None
    jitted = jitted_step(config, student, teacher, tx, schedule, mesh, placement)
    log.info(
        "%s: teacher %s top-1 %.4f; %d images, %d steps (%d per epoch), batch %d on %d devices",
        JOB, teacher.path, taught["top1"], z["num_images"], z["total"], z["spe"], z["batch"],
        mesh.devices.size,
    )  # fmt: skip
    writer = MetricWriter(workdir, enabled=None)
    history: list[dict[str, float]] = []

    def evaluate(step: int, s: ClassifierState) -> dict[str, float]:
        v = {"params": s.params, "batch_stats": s.batch_stats}
        ev = classifier.evaluate_classifier(config, student.model, v, mesh)
        history.append({"step": step, "epoch": step / z["spe"], **ev})
        writer.write(step, {"eval_top1": ev["top1"], "eval_top5": ev["top5"]})
        return ev

    every = int(round(sec.eval_every_epochs * z["spe"])) if sec.eval_every_epochs else 0
    spec = loop.Run(
        name=JOB,
        step_fn=lambda s, b: jitted(s, teacher_vars, b),
        host_batches=lambda: host_batches(config, z["batch"], z["label_batch"], start, cache),
        mesh=mesh,
        total_steps=z["total"],
        steps_per_epoch=z["spe"],
        batch_size=z["batch"],
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps,
        writer=writer,
        manager=manager,
        hint="lower distill.base_lr (or raise distill.temperature)",
        hooks=[(every, evaluate)],
        show={"loss": "loss", "agree": "agreement"},
    )
    try:
        out = loop.run(spec, state, start)
    finally:
        loop.close_manager(manager)
    if out.preempted:
        writer.close()
        return {"steps": z["total"], "preempted": True, "state": out.state}
    ev = evaluate(z["total"], out.state)
    writer.close()
    result = _finish(config, workdir, student, teacher, out.state, z)
    result.update(top1=ev["top1"], top5=ev["top5"], num_test_examples=ev["num_examples"])
    result.update(teacher_top1=taught["top1"], teacher_top5=taught["top5"], history=history)
    classifier.write_result(workdir, JOB, result)
    if jax.process_index() == 0:
        print(
            f"distilled student top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f}; teacher top-1 "
            f"{taught['top1']:.4f} top-5 {taught['top5']:.4f} ({z['total']} steps, T="
            f"{sec.temperature:g}, {teacher.path})",
            flush=True,
        )
    return result


def _finish(
    config: ml_collections.ConfigDict,
    workdir: str,
    student: Student,
    teacher: Teacher,
    state: ClassifierState,
    z: dict[str, int],
) -> dict[str, Any]:
    """Exports the student; the result's description of the run (without the evaluations)."""
    sec = config.distill
    info = {
        "teacher": teacher.path,
        "teacher_kind": teacher.kind,
        "teacher_head_layer": teacher.head_layer,
        "student_init": student.init,
        "temperature": float(sec.temperature),
        "label_weight": float(sec.label_weight),
        "step": z["total"],
    }
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return {
        "job": JOB,
        "steps": z["total"],
        "epochs": float(sec.epochs),
        "preempted": False,
        "num_images": z["num_images"],
        "num_labels": z["num_labels"],
        "batch_size": z["batch"],
        **info,
        "student": student.model_config.to_dict(),
        "teacher_model": teacher.model_config.to_dict(),
        "export": _export_student(config, workdir, student, variables, info),
        "config": {**config.to_dict(), "model": student.model_config.to_dict()},
        "variables": variables,  # dropped from distill.json by write_result
    }
