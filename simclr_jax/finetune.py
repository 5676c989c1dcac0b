"""Using a pretrained encoder: load an export, linear evaluation, and fine-tuning."""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import augment, checkpoint, config_base, data, evaluate, models, optim, parallel

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Pretrained encoder (+ the first k projection-head layers, SimCLR v2) + linear classifier."""

    encoder: models.ResNet
    head: models.ProjectionHead | None
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        h = self.encoder(x, train=train)
        if self.head is not None:
            h = self.head(h, train=train)[-1]
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(h)


class FinetuneState(flax.struct.PyTreeNode):
    """Fine-tuning state: step, all trainable params, BN statistics, optimizer state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def export_model_config(meta: dict[str, Any]) -> ml_collections.ConfigDict:
    """The architecture recorded in an export's export.json."""
    return ml_collections.ConfigDict(meta["model"])


def build_classifier(
    model_config: ml_collections.ConfigDict, from_head_layer: int, num_classes: int
) -> Classifier:
    """Classifier on the exported architecture, starting after `from_head_layer` head layers."""
    if not 0 <= from_head_layer <= model_config.head_layers:
        raise ValueError(
            f"finetune.from_head_layer={from_head_layer} is invalid: the export's projection head "
            f"has {model_config.head_layers} layers (allowed 0..{model_config.head_layers})"
        )
    head = None
    if from_head_layer > 0:
        head = models.ProjectionHead(
            num_layers=model_config.head_layers,
            num_used=from_head_layer,
            hidden_dim=model_config.head_hidden_dim,
            out_dim=model_config.head_out_dim,
            use_bn=model_config.head_bn,
            dtype=models.compute_dtype(model_config.dtype),
        )
    return Classifier(models.create_encoder(model_config), head, num_classes)


def load_pretrained(
    model: Classifier, exported: dict[str, Any], key: jax.Array, image_size: int
) -> dict[str, Any]:
    """Fresh classifier variables with the encoder (and used head layers) from the export."""
    variables = model.init(key, jnp.zeros((2, image_size, image_size, 3)), train=False)
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    for part in ("encoder", "head"):
        if part in params:
            params[part] = {k: exported["params"][part][k] for k in params[part]}
            if part in stats:
                stats[part] = {k: exported["batch_stats"][part][k] for k in stats[part]}
    got = jax.tree.map(jnp.shape, params)
    want = jax.tree.map(jnp.shape, variables["params"])
    if got != want:
        raise checkpoint.CheckpointError("export's parameter shapes do not match its export.json")
    return {"params": params, "batch_stats": stats}


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Class-balanced seeded subset: round(fraction * n_c) (at least 1) indices of each class."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 7])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def _finetune_step(
    state: FinetuneState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    model: Classifier,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[FinetuneState, dict[str, jax.Array]]:
    """One supervised update on an augmented (crop + flip) batch; BN statistics are global."""
    x = augment.views(key, batch["image"], config.augment, num_views=1)[0]

    def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (acc, new_vars["batch_stats"])

    (loss, (acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
    return new, {"loss": loss, "accuracy": acc}


def test_accuracy(
    model: Classifier, variables: Any, images: np.ndarray, labels: np.ndarray, mesh: Mesh, bs: int
) -> float:
    """Top-1 accuracy of the classifier in inference mode."""
    logits = evaluate.extract_features(
        lambda v, x: model.apply(v, x, train=False), variables, images, mesh, bs
    )
    return float(np.mean(np.argmax(logits, -1) == labels))


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes the export at `config.init_from` on labelled train data; writes finetune.json.

    Returns `{'test_accuracy', 'num_labels', 'steps'}`.
    """
    config_base.validate_config(config)
    if not config.init_from:
        raise ValueError("--config.init_from=PATH (an export/ folder) is required to fine-tune")
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    exported, meta = checkpoint.load_export(config.init_from)
    info = data.dataset_info(config)
    model = build_classifier(
        export_model_config(meta), config.finetune.from_head_layer, info.num_classes
    )
    train_x, train_y = data.eval_arrays(config, "train")
    test_x, test_y = data.eval_arrays(config, "test")
    keep = label_subset(train_y, config.finetune.label_fraction, config.seed)
    train_x, train_y = train_x[keep], train_y[keep]
    batch_size = min(config.batch_size, len(train_y) // mesh.devices.size * mesh.devices.size)
    parallel.check_batch_size(batch_size, mesh)
    steps_per_epoch = len(train_y) // batch_size
    total = optim.total_train_steps(config, steps_per_epoch)
    log.info(
        "fine-tuning %s on %d labelled examples (%.0f%%) for %d steps",
        config.init_from,
        len(train_y),
        100 * config.finetune.label_fraction,
        total,
    )

    root = jax.random.key(config.seed)
    variables = load_pretrained(
        model, exported, jax.random.fold_in(root, 2), config.augment.image_size
    )
    tx, _ = optim.make_optimizer(config, variables["params"], steps_per_epoch)
    rep = parallel.replicated(mesh)
    state = jax.device_put(
        FinetuneState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
        ),
        rep,
    )
    step_fn = jax.jit(
        functools.partial(_finetune_step, model=model, tx=tx, config=config),
        in_shardings=(rep, parallel.data_sharded(mesh), rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    key_root = jax.device_put(jax.random.fold_in(root, 3), rep)
    fold = jax.jit(jax.random.fold_in, out_shardings=rep)
    for step in range(total):
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_y))
        idx = order[i * batch_size : (i + 1) * batch_size]
        # Same arrays on every host; each transfers only its devices' rows (multi-host safe).
        batch = parallel.full_to_global({"image": train_x[idx], "label": train_y[idx]}, mesh)
        state, metrics = step_fn(state, batch, fold(key_root, step))
        if (step + 1) % config.log_every_steps == 0 or step + 1 == total:
            log.info("step %d/%d: loss %.4f", step + 1, total, float(metrics["loss"]))
    final = {"params": state.params, "batch_stats": state.batch_stats}
    acc = test_accuracy(model, final, test_x, test_y, mesh, config.eval.batch_size)
    result = {"test_accuracy": acc, "num_labels": int(len(train_y)), "steps": int(total)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "finetune.json"), "w") as f:
            json.dump({**result, "init_from": os.path.abspath(config.init_from)}, f, indent=2)
        print(f"fine-tuned test accuracy: {acc:.4f} ({len(train_y)} labels, {total} steps)")
    return result


def linear_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Linear probe + kNN of the export at `init_from` (or of `workdir`'s latest checkpoint)."""
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    info = data.dataset_info(config)
    if config.init_from:
        exported, meta = checkpoint.load_export(config.init_from)
        encoder = models.create_encoder(export_model_config(meta))
        variables = {
            "params": exported["params"]["encoder"],
            "batch_stats": exported["batch_stats"]["encoder"],
        }
        source = os.path.abspath(config.init_from)
    else:
        from simclr_jax import train

        state, model = train.restore_for_inference(config, workdir)
        encoder = model.encoder
        variables = {
            "params": state.params["encoder"],
            "batch_stats": state.batch_stats["encoder"],
        }
        source = os.path.abspath(workdir)

    def apply(v, x):
        return encoder.apply(v, x, train=False)

    splits = (data.eval_arrays(config, "train"), data.eval_arrays(config, "test"))
    result = evaluate.evaluate_encoder(config, apply, variables, mesh, splits, info.num_classes)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "linear_eval.json"), "w") as f:
            json.dump({**result, "source": source}, f, indent=2)
        print(f"linear probe {result['linear']:.4f}   kNN {result['knn']:.4f}   ({source})")
    return result
