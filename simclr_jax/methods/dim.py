"""Deep InfoMax (Hjelm et al. 2019), local DIM: `config.method = 'dim'`.

The global code of an image (the projection head on the pooled encoder features) is scored
against every position of a local feature map of the same image (the encoder's second-to-last
stage through `models.local_global.LocalHead`) as positives, and against every position of the
other images of the **global** batch as negatives, with the InfoNCE estimator (the paper's best)
or the Jensen-Shannon one (`config.dim.estimator`). The paper's prior matching (an adversarial
discriminator on the global code) is left out: it needs a second optimiser and adversarial
updates, and the paper's linear-evaluation gains come from the local term.

Each of the two augmented views is scored on its own (negatives: the other images' same view),
or, with `config.dim.cross_view`, the global code of one view against the locals of the other
(AMDIM's variant, Bachman et al. 2019). The paper scores raw dot products
(`config.dim.temperature = 0`); `temperature > 0` scores cosine similarities / T instead, as
NT-Xent does, which is what learns on small images (docs/methods.md has the figures).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from simclr_jax import losses_local, models
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key
from simclr_jax.models.local_global import LocalGlobalModel, LocalHead
from simclr_jax.runtime import parallel


def config_defaults() -> ml_collections.ConfigDict:
    """`config.dim`: local DIM with the InfoNCE estimator, each view on its own."""
    c = ml_collections.ConfigDict()
    c.estimator = "infonce"  # one of losses_local.ESTIMATORS: 'infonce' or 'jsd'
    c.local_hidden_dim = 512  # hidden width of the local head (its output: model.head_out_dim)
    c.cross_view = False  # True: global code of one view against the other view's locals
    # 0: raw dot-product scores (the paper's); T > 0: cosine similarities / T (see module doc)
    c.temperature = 0.0
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """A known estimator, a positive local width, and an encoder with local features."""
    d = c.dim
    allowed = sorted(losses_local.ESTIMATORS)
    check(d.estimator in allowed, "dim.estimator", d.estimator, f"one of {allowed}")
    check(
        isinstance(d.local_hidden_dim, int) and d.local_hidden_dim > 0,
        "dim.local_hidden_dim",
        d.local_hidden_dim,
        "a positive integer",
    )
    check(isinstance(d.cross_view, bool), "dim.cross_view", d.cross_view, "True or False")
    check(d.temperature >= 0, "dim.temperature", d.temperature, ">= 0 (0: raw dot products)")


def build_model(config: ml_collections.ConfigDict, num_classes: int, conv: Any = None) -> Any:
    """Encoder + projection head (global code) + local head + online linear head."""
    m = config.model
    dtype = models.compute_dtype(m.dtype)
    return LocalGlobalModel(
        encoder=models.create_encoder(m, conv),
        head=models.create_head(m),
        local_head=LocalHead(config.dim.local_hidden_dim, m.head_out_dim, dtype),
        num_classes=num_classes,
    )


def sharded_estimator(mesh: Mesh, name: str, temperature: float = 0.0) -> Any:
    """The estimator over the global batch: each device's codes against the gathered locals."""
    return parallel.over_global_batch(losses_local.ESTIMATORS[name], mesh, temperature=temperature)


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
    """One DIM update on two views: the estimator on (global, local) pairs, mean over views."""
    x = make_views(step_key(state), batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    b = labels.shape[0]
    estimator = sharded_estimator(mesh, config.dim.estimator, config.dim.temperature)
    other = 1 if config.dim.cross_view else 0

    def loss_fn(params):
        out, new_stats = base.train_apply(model, params, state.batch_stats, x)
        z = out["projection"].reshape(b, 2, -1)
        local = out["local"].reshape((b, 2) + out["local"].shape[1:])
        loss_a, m_a = estimator(z[:, 0], local[:, other])
        loss_b, m_b = estimator(z[:, 1], local[:, 1 - other])
        loss = (loss_a + loss_b) / 2
        metrics = {"dim_acc": (m_a["dim_acc"] + m_b["dim_acc"]) / 2}
        linear = online_linear_metrics(out["logits"].reshape(b, 2, -1), labels)
        embeddings = (z[:, 0], z[:, 1], out["features"])
        return loss + linear["linear_loss"], (loss, {**metrics, **linear}, new_stats, embeddings)

    return base.gradient_update(
        state, loss_fn, tx, schedule=schedule, config=config, total_steps=total_steps
    )


METHOD = base.register(
    base.Method(
        name="dim",
        train_step=train_step,
        summary="Deep InfoMax: global code vs local features, InfoNCE/JSD over the global batch",
        config_defaults=config_defaults,
        validate=validate,
        build_model=build_model,
    )
)
