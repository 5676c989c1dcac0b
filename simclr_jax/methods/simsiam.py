"""SimSiam (Chen & He 2021): one network, a predictor, and a stop-gradient on the target branch.

Both views pass through the same encoder + projector; the predictor's output for one view
regresses the other view's projection with negative cosine similarity, and the projection
gets no gradient (`simsiam.stop_gradient`; switching it off shows the collapse the paper
describes). No EMA, no negatives. The paper keeps the predictor's LR fixed: set
`optim.constant_lr_params = ('predictor',)`, as the SimSiam configs do.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from simclr_jax import losses, models
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key


def config_defaults() -> ml_collections.ConfigDict:
    """`config.simsiam`: the paper's bottleneck predictor and the stop-gradient switch."""
    c = ml_collections.ConfigDict()
    c.predictor_hidden_dim = 512  # Dense(512) -> BN -> ReLU -> Dense(projection size)
    c.stop_gradient = True  # False: the collapsing variant (for experiments only)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """A positive predictor width and a boolean stop-gradient switch."""
    s = c.simsiam
    check(s.predictor_hidden_dim > 0, "simsiam.predictor_hidden_dim", s.predictor_hidden_dim, "> 0")
    check(isinstance(s.stop_gradient, bool), "simsiam.stop_gradient", s.stop_gradient, "True/False")


def resolve(c: ml_collections.ConfigDict, total_steps: int, num_train_examples: int) -> list[str]:
    """A warning when the optimizer is not the paper's SGD with a fixed-LR predictor."""
    o = c.optim
    if o.name == "sgd" and "predictor" in tuple(o.constant_lr_params):
        return []
    return [
        f"WARNING: SimSiam with optim.name={o.name!r} and optim.constant_lr_params="
        f"{tuple(o.constant_lr_params)!r}: the paper trains it with SGD (momentum 0.9) and the "
        "predictor at a fixed LR (--config.optim.name=sgd --config.optim.constant_lr_params="
        "\"('predictor',)\"), and SimSiam needs its own LR, head and run length too: start from "
        "configs/simsiam_digits.py or configs/simsiam_cifar10.py (on digits, the SimCLR config "
        "with --config.method=simsiam ends below random init on kNN, with AdamW or SGD)"
    ]


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, conv: Any = None
) -> models.SimCLRModel:
    """Encoder + projection head (its output BN without scale or shift) + the predictor."""
    predictor = models.Predictor(
        hidden_dim=config.simsiam.predictor_hidden_dim,
        out_dim=config.model.head_out_dim,
        dtype=models.compute_dtype(config.model.dtype),
    )
    # The paper's projector ends in an affine-free BN. A learned scale there lets SGD shrink
    # whole output dimensions to 0: on digits seed 1 partly collapsed with it (kNN 0.658;
    # 0.839 without; docs/methods.md).
    return models.create_model(
        config, num_classes, predictor=predictor, head_out_scale=False, conv=conv
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: Any,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SimSiam update on the two views of each image."""
    x = make_views(step_key(state), batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    b = labels.shape[0]

    def loss_fn(params):
        out, new_stats = base.train_apply(model, params, state.batch_stats, x)
        p = out["prediction"].reshape(b, 2, -1)
        z = out["projection"].reshape(b, 2, -1)
        loss = losses.simsiam_loss(
            p[:, 0], p[:, 1], z[:, 0], z[:, 1], stop_gradient=config.simsiam.stop_gradient
        )
        linear = online_linear_metrics(out["logits"].reshape(b, 2, -1), labels)
        aux = (loss, linear, new_stats, (z[:, 0], z[:, 1], out["features"]))
        return loss + linear["linear_loss"], aux

    return base.gradient_update(
        state, loss_fn, tx, schedule=schedule, config=config, total_steps=total_steps
    )


METHOD = base.register(
    base.Method(
        name="simsiam",
        train_step=train_step,
        summary="SimSiam: predictor regresses the other view's stop-gradient projection (-cos)",
        config_defaults=config_defaults,
        validate=validate,
        build_model=build_model,
        resolve=resolve,
    )
)
