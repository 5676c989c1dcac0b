"""The parts of a downstream run on a pretrained encoder: model, source, step, evaluation.

Linear evaluation (frozen encoder, BN in inference mode, stop-gradient) and fine-tuning (the whole
network or from projection-head layer k, global BN) train the same `Classifier` with a different
trainable set; `classifier_run.run_classifier` runs them in the run loop. Here: loading the
encoder (an export or a pretraining state) with its shapes checked, the jitted train step (device
crop + flip), the streamed top-1 / top-5 evaluation over the whole eval split, the result file.
A text encoder takes the batches' 'tokens' as they come (no augmentation; `text_config` points
the labelled text streams at its tokenizer and length).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import augment, checkpoint, models, optim
from simclr_jax.data import labelled, tokenizer
from simclr_jax.data.datasets import modality
from simclr_jax.runtime import compiled, cpu_conv, files, keys, loop, parallel

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Encoder (+ the first k projection-head layers, SimCLR v2) + a zero-initialised linear layer.

    `freeze` stops gradients at the features (linear evaluation).
    """

    encoder: models.ResNet | models.ViT | models.TextTransformer
    head: models.ProjectionHead | None
    num_classes: int
    freeze: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        h = self.encoder(x, train=train)
        if self.head is not None:
            h = self.head(h, train=train)[-1]
        if self.freeze:
            h = jax.lax.stop_gradient(h)
        dense = nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            kernel_init=nn.initializers.zeros,
            name="classifier",
        )
        return dense(h.astype(jnp.float32))


class ClassifierState(flax.struct.PyTreeNode):
    """What a downstream run needs to continue: step, trainable params and BN stats, optimizer."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Source:
    """A pretrained encoder: architecture, exported variables and where they came from."""

    model_config: ml_collections.ConfigDict
    variables: dict[str, Any]  # {'params'|'batch_stats': {'encoder': ..., 'head': ...}}
    path: str


def load_source(config: ml_collections.ConfigDict, job: str, fallback: str = "") -> Source:
    """The export at `config.init_from`; refuses an empty one (`fallback` says what else works)."""
    if not config.init_from:
        raise ValueError(
            f"--mode={job} needs --config.init_from=EXPORT (a pretraining run's export/ "
            f"folder){fallback}; config.init_from is empty."
        )
    variables, meta = checkpoint.load_export(config.init_from)
    return Source(ml_collections.ConfigDict(meta["model"]), variables, config.init_from)


def source_from_state(model_config: ml_collections.ConfigDict, state: Any, path: str) -> Source:
    """A pretraining train state's encoder and head as a Source (numpy, off the devices)."""
    params, stats = jax.device_get((state.params, state.batch_stats))
    variables = {
        "params": {"encoder": params["encoder"], "head": params.get("head", {})},
        "batch_stats": {"encoder": stats.get("encoder", {}), "head": stats.get("head", {})},
    }
    # As an export describes it: the run's architecture plus what the method built of the head.
    described = ml_collections.ConfigDict(
        {
            **models.describe_encoder(model_config, params["encoder"]),
            "head_out_scale": models.head_out_scale(model_config, params.get("head", {})),
        }
    )
    return Source(described, variables, path)


def config_as_run(config: ml_collections.ConfigDict, source: Source) -> dict[str, Any]:
    """The run's config as it ran: `model` is the source encoder's architecture, not config's."""
    return {**config.to_dict(), "model": source.model_config.to_dict()}


def report_overrides(config: ml_collections.ConfigDict, source: Source) -> list[str]:
    """Logs in one line every `config.model` value the source's architecture overrides."""
    ours, theirs = config.model.to_dict(), source.model_config.to_dict()
    diffs = [
        f"model.{k}={ours[k]!r} (the encoder has {theirs[k]!r})"
        for k in sorted(theirs)
        if k in ours and ours[k] != theirs[k]
    ]
    if diffs:
        log.warning(
            "%s: using the encoder's own architecture; these config values are ignored: %s",
            source.path,
            "; ".join(diffs),
        )
    return diffs


def build_classifier(
    model_config: ml_collections.ConfigDict, from_head_layer: int, num_classes: int, freeze: bool
) -> Classifier:
    """Classifier on the source architecture, starting after `from_head_layer` head layers."""
    if not 0 <= from_head_layer <= model_config.head_layers:
        raise ValueError(
            f"finetune.from_head_layer={from_head_layer} is invalid: the export's projection head "
            f"has {model_config.head_layers} layers (allowed 0..{model_config.head_layers})"
        )
    head = None
    if from_head_layer > 0:
        head = models.create_head(
            model_config, model_config.head_out_scale, num_used=from_head_layer
        )
    return Classifier(
        models.create_encoder(model_config, conv=cpu_conv.for_backend()), head, num_classes, freeze
    )


def initial_variables(model: Classifier, source: Source, image_size: int) -> dict[str, Any]:
    """Classifier variables: encoder (and used head layers) from the source, zero linear layer.

    Raises `CheckpointError` naming the first leaf whose shape differs from the architecture.
    """
    dummy = models.dummy_input(source.model_config, image_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, False))
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for col in ("params", "batch_stats"):
        for part, want in shapes.get(col, {}).items():
            if part == "classifier":
                out[col][part] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), want)
                continue
            have = source.variables.get(col, {}).get(part)
            try:
                got = {k: have[k] for k in want} if have is not None else None
            except KeyError as e:
                got, missing = None, e
            else:
                missing = None
            if got is None or jax.tree.structure(got) != jax.tree.structure(want):
                raise checkpoint.CheckpointError(
                    f"{source.path}: its {col}/{part} does not match the architecture in its "
                    f"description (missing {missing or 'leaves'}); model {source.model_config}"
                )
            for (path, a), b in zip(
                jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
            ):
                if tuple(np.shape(a)) != tuple(b.shape):
                    raise checkpoint.CheckpointError(
                        f"{source.path}: {col}/{part}{jax.tree_util.keystr(path)} has shape "
                        f"{tuple(np.shape(a))}, the architecture in its description needs "
                        f"{tuple(b.shape)}: the export does not match its export.json"
                    )
            out[col][part] = got
    return out


def model_input(batch: dict[str, jax.Array]) -> jax.Array:
    """An eval batch's encoder input: int32 'tokens' as they are, else 'image' as [0, 1] floats."""
    if "tokens" in batch:
        return batch["tokens"]
    return batch["image"].astype(jnp.float32) / 255.0


def text_config(
    config: ml_collections.ConfigDict, source: Source, job: str
) -> ml_collections.ConfigDict:
    """`config` for the labelled streams of a text encoder: its tokenizer and lengths; as is for
    images.

    `data.tokenizer` '' becomes the tokenizer.json beside the source (an export, or the workdir
    whose checkpoint is evaluated); `model.max_len` / `vocab_size` become the encoder's, so texts
    are truncated where it was trained. A missing tokenizer file is a one-line error naming it.
    """
    if models.encoder_name(source.model_config) != "text":
        if modality(config.dataset) == "text":
            raise ValueError(
                f"config.dataset={config.dataset!r} is text but {source.path} holds an image "
                f"encoder ({models.encoder_name(source.model_config)!r})."
            )
        return config
    if modality(config.dataset) != "text":
        raise ValueError(
            f"{source.path} holds a text encoder but config.dataset={config.dataset!r} is not "
            "a text dataset."
        )
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if not config.data.tokenizer:
            config.data.tokenizer = os.path.join(source.path, tokenizer.TOKENIZER_FILE)
        config.model.max_len = int(source.model_config.max_len)
        config.model.vocab_size = int(source.model_config.vocab_size)
    if not os.path.isfile(config.data.tokenizer):
        raise ValueError(
            f"tokenizer file {config.data.tokenizer} does not exist: the text encoder's "
            f"tokenizer.json (or set config.data.tokenizer=PATH)."
        )
    section = config.get(job)
    if section is not None and section.get("augment"):
        log.info("%s: %s.augment is ignored for text (no augmentation of tokens)", job, job)
    return config


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """bool [B]: whether each label is among the k largest logits (k capped at the classes)."""
    k = min(k, logits.shape[-1])
    return jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)


def train_augment_config(config: ml_collections.ConfigDict, enabled: bool) -> Any:
    """SimCLR's train-time preprocessing for supervised heads: random resized crop + flip only."""
    cfg = augment.default_augment_config(config.augment.image_size)
    cfg.crop = enabled
    cfg.area_min = config.augment.area_min
    cfg.flip = enabled and config.augment.flip
    cfg.color_jitter_prob = cfg.grayscale_prob = cfg.blur_prob = cfg.solarize_prob = 0.0
    return cfg


def classifier_train_step(
    state: ClassifierState,
    frozen: Any,
    batch: dict[str, jax.Array],
    *,
    model: Classifier,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    aug_cfg: Any,
    seed: int,
) -> tuple[ClassifierState, dict[str, jax.Array]]:
    """One supervised update on a crop + flip view (text: the tokens as they are); BN statistics
    are global (the whole batch)."""
    if "tokens" in batch:
        x = batch["tokens"]
    else:
        key = jax.random.fold_in(keys.derive(seed, keys.CLASSIFIER_STEPS), state.step)
        x = augment.views(key, batch["image"], aug_cfg, num_views=1)[0]

    def loss_fn(params):
        variables = {
            "params": {**frozen["params"], **params},
            "batch_stats": {**frozen["batch_stats"], **state.batch_stats},
        }
        if model.freeze:  # linear evaluation: BN in inference mode, nothing but the head learns
            logits, stats = model.apply(variables, x, train=False), state.batch_stats
        else:
            logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
            stats = new.get("batch_stats", {})  # none: a ViT without head layers
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, stats)

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
    return new, {
        "loss": loss,
        "train_top1": jnp.mean(topk_correct(logits, batch["label"], 1)),
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
    }


def _eval_counts(variables: Any, batch: dict[str, jax.Array], *, model: Classifier) -> jax.Array:
    """[3] int32: top-1 hits, top-5 hits and valid rows of a padded eval batch."""
    x = model_input(batch)
    logits = model.apply(variables, x, train=False)
    mask = batch["mask"]
    return jnp.stack(
        [
            jnp.sum(topk_correct(logits, batch["label"], 1) & mask),
            jnp.sum(topk_correct(logits, batch["label"], 5) & mask),
            jnp.sum(mask),
        ]
    ).astype(jnp.int32)


def evaluate_classifier(
    config: ml_collections.ConfigDict,
    model: Classifier,
    variables: Any,
    mesh: Mesh,
    *,
    max_examples: int = 0,
    variables_shardings: Any = None,
) -> dict[str, float]:
    """`{'top1', 'top5', 'num_examples'}` on the whole test split, streamed per host.

    `variables_shardings`: how `variables` lie on the mesh (default: replicated).
    """
    rep = parallel.replicated(mesh)
    placed = rep if variables_shardings is None else variables_shardings
    fn = compiled.cached(
        lambda: jax.jit(
            functools.partial(_eval_counts, model=model),
            in_shardings=(placed, parallel.data_sharded(mesh)),
            out_shardings=rep,
        ),
    )
    batches, n = labelled.eval_batches(
        config, "test", global_batch(config.eval.batch_size, mesh), max_examples=max_examples
    )
    total = jnp.zeros((3,), jnp.int32)
    for _ in range(n):
        total = total + fn(variables, parallel.host_to_global(next(batches), mesh))
    loop.finish_eval_stream(f"evaluation on {config.dataset} test", batches)
    hits1, hits5, count = (int(v) for v in jax.device_get(total))
    return {"top1": hits1 / max(count, 1), "top5": hits5 / max(count, 1), "num_examples": count}


def global_batch(batch_size: int, mesh: Mesh, limit: int = 0) -> int:
    """`batch_size` (at most `limit`) rounded down to a multiple of the devices (at least one)."""
    n = mesh.devices.size
    if limit:
        batch_size = min(batch_size, limit)
    return max(n, batch_size // n * n)


def make_optimizer(
    section: ml_collections.ConfigDict,
    params: Any,
    batch: int,
    total: int,
    spe: int,
    lars_tc: float,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`optim.make_optimizer` on a downstream section's keys (warm-up + cosine over the run)."""
    oc = ml_collections.ConfigDict(
        {
            "batch_size": batch,
            "total_steps": total,
            "num_epochs": float(section.epochs),
            "optim": {
                "constant_lr_params": (),
                "name": section.optimizer,
                "base_lr": section.base_lr,
                "lr_scaling": section.lr_scaling,
                "weight_decay": section.weight_decay,
                "momentum": section.momentum,
                "trust_coefficient": lars_tc,
                "warmup_epochs": section.warmup_epochs,
                "grad_clip_norm": 0.0,
            },
        }
    )
    return optim.make_optimizer(oc, params, spe)


def write_result(workdir: str, name: str, result: dict[str, Any]) -> str:
    """Writes `workdir/<name>.json` (process 0) from a result without its arrays; returns path."""
    path = os.path.join(workdir, f"{name}.json")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        clean = {k: v for k, v in result.items() if k != "variables"}
        files.write_json_atomic(path, clean, indent=2, default=float)
    return path


def apply_encoder(model: Classifier) -> Callable[[Any, jax.Array], jax.Array]:
    """`(classifier variables, float images) -> pooled features` in inference mode (for kNN).

    One function per architecture, so feature extraction compiles once per process.
    """

    def make() -> Callable[[Any, jax.Array], jax.Array]:
        def apply(variables: Any, x: jax.Array) -> jax.Array:
            enc = {
                "params": variables["params"]["encoder"],
                "batch_stats": variables["batch_stats"].get("encoder", {}),
            }
            return model.encoder.apply(enc, x, train=False)

        return apply

    return compiled.cached(make)
