"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057): `config.method = 'mocov3'`.

Query network: encoder + projector + predictor (`state.params`, the network that is exported).
Key network: an EMA copy of the encoder + projector (`method_state['key_params']`, no
predictor) whose rate rises from `mocov3.momentum` (0.99) to 1 on a cosine. No queue: each
query's negatives are the other keys of the global batch, and the loss is the symmetric
`ctr(q1, k2) + ctr(q2, k1)`, ctr = InfoNCE x 2T, as facebookresearch/moco-v3's `builder.py`.

Heads as the official code: every Dense without bias, BN + ReLU between layers, the projector
(`config.model.head_*`: 2 layers on a ResNet, 3 on a ViT, 4096 -> 256) and the ViT predictor
end in an affine-free BN; the ResNet predictor ends in its Dense. Each view passes through
each network on its own, so BatchNorm normalises over one view of the global batch, as the
official two forward passes with SyncBN do. The ViT recipe's stabiliser, a frozen random patch
projection (`mocov3.freeze_patch_embed`, on by default for ViTs), is a zero optimizer update
for `params['encoder']['embedding']` (`optim.freeze`) and a stop-gradient in the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from simclr_jax import losses, models
from simclr_jax.config.checks import ConfigError, check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key
from simclr_jax.runtime import parallel

# The paper's temperature per encoder family (its section 4 and the official CONFIG.md: 1.0
# for ResNet-50, 0.2 for ViTs); `mocov3.temperature = -1` picks this one.
TEMPERATURES = {"resnet": 1.0, "vit": 0.2}
PATCH_EMBEDDING = ("encoder", "embedding")  # the ViT's patch projection in the params
KeyPaths = tuple[tuple[str, ...], ...]


def config_defaults() -> ml_collections.ConfigDict:
    """`config.mocov3`: the paper's momentum, predictor and encoder-dependent defaults."""
    c = ml_collections.ConfigDict()
    c.momentum = 0.99  # key EMA rate at step 0 ...
    c.momentum_cosine = True  # ... raised to 1 on a half cosine (official --moco-m-cos)
    c.temperature = -1.0  # -1: follows the encoder, TEMPERATURES (0.2 ViT, 1.0 ResNet)
    c.predictor_hidden_dim = 4096  # Dense(4096) -> BN -> ReLU -> Dense(projection size)
    # The frozen random patch projection (the paper's section 5.1); None: on for ViTs, off for
    # ResNets (which have no patch projection: True is refused there).
    c.freeze_patch_embed = ml_collections.config_dict.placeholder(bool)
    return c


def encoder_family(config: ml_collections.ConfigDict) -> str:
    """'vit' or 'resnet': the encoder `config.model` describes."""
    return models.encoder_name(config.model)


def temperature(config: ml_collections.ConfigDict) -> float:
    """`mocov3.temperature`, or when it is -1 the paper's value for the encoder."""
    t = float(config.mocov3.temperature)
    return TEMPERATURES[encoder_family(config)] if t == -1 else t


def freezes_patch_embed(config: ml_collections.ConfigDict) -> bool:
    """`mocov3.freeze_patch_embed`, or when it is None: True exactly for ViTs."""
    freeze = config.mocov3.freeze_patch_embed
    return encoder_family(config) == "vit" if freeze is None else bool(freeze)


def frozen_params(config: ml_collections.ConfigDict) -> KeyPaths:
    """The patch projection when it is frozen, else nothing (the registry's hook)."""
    return (PATCH_EMBEDDING,) if freezes_patch_embed(config) else ()


def validate(c: ml_collections.ConfigDict) -> None:
    """Momentum in [0, 1), temperature > 0 or -1, predictor width > 0, freezing only on a ViT."""
    m = c.mocov3
    check(0 <= m.momentum < 1, "mocov3.momentum", m.momentum, "in [0, 1)")
    check(
        m.temperature > 0 or m.temperature == -1,
        "mocov3.temperature",
        m.temperature,
        f"> 0, or -1 for the encoder's default {TEMPERATURES}",
    )
    check(m.predictor_hidden_dim > 0, "mocov3.predictor_hidden_dim", m.predictor_hidden_dim, "> 0")
    check(
        m.freeze_patch_embed in (None, True, False),
        "mocov3.freeze_patch_embed",
        m.freeze_patch_embed,
        "True, False, or None (True for ViTs)",
    )
    family = encoder_family(c)
    if m.freeze_patch_embed and family != "vit":
        raise ConfigError(
            f"config.mocov3.freeze_patch_embed=True is invalid with model.name={family!r}: "
            "only a ViT has a patch projection to freeze (use model.name='vit', or False)"
        )


def resolve(c: ml_collections.ConfigDict, total_steps: int, num_train_examples: int) -> list[str]:
    """The temperature, EMA and patch projection this run uses; a warning for a slow EMA."""
    m = c.mocov3
    ema = f"from {m.momentum:g} to 1 (cosine over {total_steps} steps)"
    frozen = ", patch projection frozen" if freezes_patch_embed(c) else ""
    lines = [
        f"MoCo v3: temperature {temperature(c):g}, key EMA "
        f"{ema if m.momentum_cosine else f'{m.momentum:g}'}{frozen}"
    ]
    return lines + base.ema_time_constant_warning(
        "mocov3.momentum", m.momentum, total_steps, base.auto_momentum(total_steps, 0.9, 0.99)
    )


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, conv: Any = None
) -> models.SimCLRModel:
    """The query network: encoder + projector (affine-free last BN) + MoCo v3's predictor."""
    vit = encoder_family(config) == "vit"
    predictor = models.Predictor(
        hidden_dim=config.mocov3.predictor_hidden_dim,
        out_dim=config.model.head_out_dim,
        dtype=models.compute_dtype(config.model.dtype),
        out_bias=False,
        out_bn=vit,  # the official MoCo_ViT predictor ends in BN, MoCo_ResNet's does not
    )
    return models.create_model(
        config, num_classes, predictor=predictor, head_out_scale=False, conv=conv
    )


def key_part(tree: dict[str, Any]) -> dict[str, Any]:
    """The key network's share of a params / batch_stats tree: all but the predictor."""
    return {k: v for k, v in tree.items() if k != "predictor"}


def init_state(config: Any, variables: dict[str, Any], key: jax.Array, n: int) -> dict[str, Any]:
    """The key network starts as a copy of the query encoder + projector."""
    return {
        "key_params": key_part(variables["params"]),
        "key_batch_stats": key_part(variables["batch_stats"]),
    }


def _under(path: Any, paths: KeyPaths) -> bool:
    keys = tuple(getattr(p, "key", None) for p in path)
    return any(keys[: len(f)] == f for f in paths)


def stop_frozen(params: Any, paths: KeyPaths) -> Any:
    """`params` with a stop-gradient on the subtrees at `paths` (their gradient is exactly 0)."""
    if not paths:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if _under(path, paths) else x, params
    )


def momentum_at(config: ml_collections.ConfigDict, step: jax.Array, total_steps: int) -> jax.Array:
    """Key EMA rate at `step`: `1 - (1 - m)(cos(pi k / K) + 1) / 2`, or `m` without the cosine."""
    m = config.mocov3
    return base.cosine_momentum(
        m.momentum, m.momentum_cosine, step, total_steps, "mocov3.momentum_cosine"
    )


def update_key_params(key_params: Any, params: Any, momentum: jax.Array, frozen: KeyPaths) -> Any:
    """The EMA of the key network towards the query network; frozen subtrees copied exactly.

    (The EMA of two equal arrays is not always bit-equal to them: copying keeps the key
    network's frozen patch projection the query's.)
    """
    new = base.ema(key_params, key_part(params), momentum)
    if not frozen:
        return new
    return jax.tree_util.tree_map_with_path(
        lambda path, e, q: q if _under(path, frozen) else e, new, key_part(params)
    )


def symmetric_loss(
    q1: jax.Array,
    q2: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    temperature: float,
    axis_name: losses.AxisName = None,
) -> tuple[jax.Array, jax.Array]:
    """`ctr(q1, k2) + ctr(q2, k1)`, ctr = 2T x InfoNCE against the global batch of keys.

    Returns `(loss, contrastive accuracy averaged over both directions)`. The 2T factor is the
    official code's: it keeps the gradient's scale independent of T.
    """
    l12, a12 = losses.batch_info_nce(q1, k2, temperature, axis_name)
    l21, a21 = losses.batch_info_nce(q2, k1, temperature, axis_name)
    return 2.0 * temperature * (l12 + l21), (a12 + a21) / 2.0


def sharded_loss(mesh: Mesh, temperature: float) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`symmetric_loss` with each device's queries against the gathered keys of all devices."""
    return parallel.over_global_batch(symmetric_loss, mesh, num_inputs=4, temperature=temperature)


def key_projections(
    model: models.SimCLRModel, key_params: Any, key_stats: Any, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array, Any]:
    """The key network's stop-gradient projections of both views and its new BN statistics.

    Train-mode BN over each view of the global batch, as the official momentum encoder.
    """
    key_model = model.clone(predictor=None)
    out1, key_stats = base.train_apply(key_model, key_params, key_stats, x1)
    out2, key_stats = base.train_apply(key_model, key_params, key_stats, x2)
    k1, k2 = out1["projection"], out2["projection"]
    return jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2), jax.lax.stop_gradient(key_stats)


def mocov3_loss(
    params: Any,
    batch_stats: Any,
    x1: jax.Array,
    x2: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    labels: jax.Array,
    *,
    model: models.SimCLRModel,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> tuple[jax.Array, dict[str, Any]]:
    """MoCo v3's loss (+ the online linear head's) of the query `params` against keys k1, k2.

    Returns `(total loss, aux)` with the contrastive loss, metrics, embeddings and new BN
    statistics. The frozen patch projection gets a stop-gradient here.
    """
    params = stop_frozen(params, frozen_params(config))
    out1, stats = base.train_apply(model, params, batch_stats, x1)
    out2, stats = base.train_apply(model, params, stats, x2)
    loss, acc = sharded_loss(mesh, temperature(config))(
        out1["prediction"], out2["prediction"], k1, k2
    )
    linear = online_linear_metrics(jnp.stack([out1["logits"], out2["logits"]], axis=1), labels)
    aux = {
        "loss": loss,
        "metrics": {"contrastive_acc": acc, **linear},
        "embeddings": (
            out1["projection"],
            out2["projection"],
            jnp.concatenate([out1["features"], out2["features"]]),
        ),
        "batch_stats": stats,
    }
    return loss + linear["linear_loss"], aux


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: models.SimCLRModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One MoCo v3 update, in the official order.

    EMA of the key network towards the current query network (rate at this step) -> keys of
    both views -> symmetric loss of the queries -> optimizer update of the query network.
    """
    total_steps = total_steps or int(config.total_steps)
    x = make_views(step_key(state), batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    # make_views interleaves the two views of each image: rows 2i (view 1), 2i + 1 (view 2).
    pairs = x.reshape((labels.shape[0], 2) + x.shape[1:])
    x1, x2 = pairs[:, 0], pairs[:, 1]
    ms = state.method_state
    momentum = momentum_at(config, state.step, total_steps)
    key_params = update_key_params(ms["key_params"], state.params, momentum, frozen_params(config))
    k1, k2, key_stats = key_projections(model, key_params, ms["key_batch_stats"], x1, x2)

    loss_fn = functools.partial(mocov3_loss, model=model, config=config, mesh=mesh)
    grads, aux = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x1, x2, k1, k2, labels
    )
    new_state = base.apply_gradients(
        state,
        grads,
        tx,
        batch_stats=aux["batch_stats"],
        method_state={"key_params": key_params, "key_batch_stats": key_stats},
    )
    metrics = base.step_metrics(
        state.step,
        new_state,
        grads,
        aux["loss"],
        {**aux["metrics"], "mocov3_momentum": momentum},
        aux["embeddings"],
        schedule=schedule,
        config=config,
        total_steps=total_steps,
    )
    return new_state, metrics


METHOD = base.register(
    base.Method(
        name="mocov3",
        train_step=train_step,
        summary="MoCo v3: symmetric InfoNCE of predictions against an EMA key network's "
        "projections of the global batch (no queue)",
        config_defaults=config_defaults,
        validate=validate,
        build_model=build_model,
        init_state=init_state,
        resolve=resolve,
        frozen_params=frozen_params,
    )
)
