"""Contrastive predictive coding, CPC v2 (Hénaff et al. 2019): `config.method = 'cpc'`.

The image (one augmented crop) is cut into the overlapping patch grid of `config.model.patch_grid`
/ `patch_grid_stride`, each patch is augmented on its own (colour, grayscale, flip and a small
crop: CPC v2's per-patch augmentation) and encoded by the registered encoder
(`models.patch_grid.PatchGridEncoder`). For each of `config.cpc.directions` directions (the grid
rotated by quarter turns; v2 uses all 4) a masked context network summarises rows <= i and a
linear map per offset k = 1..`config.cpc.steps` predicts the features of row i + k. InfoNCE
scores each prediction against every patch of the **global** batch (`losses_local.cpc_infonce`).
The evaluated representation is the mean of the patch features (what `PatchGridEncoder` returns).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import augment, losses_local, models
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, online_linear_metrics, step_key
from simclr_jax.models.heads import LinearHead
from simclr_jax.models.patch_grid import ContextNetwork, direction_targets, extract_patches
from simclr_jax.runtime import parallel


def config_defaults() -> ml_collections.ConfigDict:
    """`config.cpc`: CPC v2's four directions; steps and widths sized by each config."""
    c = ml_collections.ConfigDict()
    c.steps = 5  # predict rows i+1 .. i+steps (CPC's 7x7 grid: up to 5 rows ahead)
    c.directions = 4  # 1: top-down only (CPC v1); 4: all four (CPC v2)
    c.context_dim = 512  # width of the context network
    c.context_layers = 2  # residual masked-conv blocks in the context network
    c.patch_area_min = 0.6  # per-patch random crop (spatial jitter) area range [min, 1]
    c.temperature = 0.0  # 0: raw dot-product scores (the paper's); T > 0: cosine / T
    return c


def grid(config: Any) -> int:
    """Patches per side of the grid the config gives (`config.model.patch_grid*`)."""
    m = config.model
    return (config.augment.image_size - m.patch_grid) // m.patch_grid_stride + 1


def targets(config: Any) -> np.ndarray:
    """`[P]` flat grid indices of the predictions' targets: by direction, offset k, row-major."""
    g = grid(config)
    return np.concatenate(
        [
            direction_targets(g, d, k)
            for d in range(config.cpc.directions)
            for k in range(1, config.cpc.steps + 1)
        ]
    )


def validate(c: ml_collections.ConfigDict) -> None:
    """A patch grid with more rows than prediction steps, 1 or 4 directions, positive widths."""
    m, p = c.model, c.cpc
    check(m.patch_grid > 0, "model.patch_grid", m.patch_grid, "> 0 for method='cpc' (patch px)")
    check(
        0 < m.patch_grid <= c.augment.image_size,
        "model.patch_grid",
        m.patch_grid,
        f"<= augment.image_size={c.augment.image_size}",
    )
    g = grid(c)
    check(p.directions in (1, 4), "cpc.directions", p.directions, "1 (top-down) or 4 (CPC v2)")
    check(0 < p.steps < g, "cpc.steps", p.steps, f"in [1, {g - 1}] for a {g}x{g} patch grid")
    for key in ("context_dim", "context_layers"):
        check(p[key] > 0, f"cpc.{key}", p[key], "> 0")
    check(0 < p.patch_area_min <= 1, "cpc.patch_area_min", p.patch_area_min, "in (0, 1]")
    check(p.temperature >= 0, "cpc.temperature", p.temperature, ">= 0 (0: raw dot products)")


class CPCModel(nn.Module):
    """Patch-grid encoder, one context network per direction, linear predictors, linear head."""

    encoder: Any
    num_classes: int
    steps: int
    directions: int
    context_dim: int
    context_layers: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> dict[str, Any]:
        features, fgrid = self.encoder(x, train=train, with_grid=True)  # [B, D], [B, G, G, D]
        b, g, _, d = fgrid.shape
        preds = []
        for r in range(self.directions):
            rotated = jnp.rot90(fgrid, r, axes=(1, 2))
            ctx = ContextNetwork(self.context_dim, self.context_layers, name=f"context{r}")(rotated)
            for k in range(1, self.steps + 1):
                pk = nn.Dense(d, use_bias=False, name=f"predict{r}_{k}")(ctx[:, : g - k])
                preds.append(pk.reshape(b, -1, d))
        flat = fgrid.reshape(b, g * g, d)
        return {
            "features": features,
            "patches": flat,
            "predictions": jnp.concatenate(preds, axis=1),
            "logits": LinearHead(self.num_classes, name="linear_head")(features),
        }


def build_model(config: ml_collections.ConfigDict, num_classes: int, conv: Any = None) -> Any:
    """The CPC network on the patch-grid encoder `models.create_encoder` builds."""
    return CPCModel(
        encoder=models.create_encoder(config.model, conv),
        num_classes=num_classes,
        steps=config.cpc.steps,
        directions=config.cpc.directions,
        context_dim=config.cpc.context_dim,
        context_layers=config.cpc.context_layers,
    )


def _section(config: Any, **changes: Any) -> ml_collections.ConfigDict:
    """A copy of `config.augment` with `changes`."""
    section = ml_collections.ConfigDict(config.augment.to_dict())
    section.update(changes)
    return section


def patches_of(key: jax.Array, images: jax.Array, config: Any, boxes: Any) -> jax.Array:
    """One crop + flip per image, cut into the grid, each patch colour-augmented on its own."""
    k_view, k_patch = jax.random.split(key)
    no_colour = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    view = augment.views(
        k_view,
        images,
        _section(config, **no_colour),
        num_views=1,
        boxes=None if boxes is None else boxes[:, :1],
    )[0]
    m = config.model
    patches = extract_patches(view, m.patch_grid, m.patch_grid_stride)  # [B, G, G, p, p, 3]
    shape = patches.shape
    per_patch = _section(
        config, image_size=m.patch_grid, area_min=config.cpc.patch_area_min, blur_prob=0.0
    )
    flat = patches.reshape((-1,) + shape[3:])
    out = augment.views(k_patch, flat, per_patch, num_views=1)[0]
    return out.reshape(shape)


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
    """One CPC update: per-patch views, predictions in every direction, InfoNCE over the batch."""
    x = patches_of(step_key(state), batch["image"], config, batch.get("crop"))
    labels = batch["label"]
    loss_fn_sharded = parallel.over_global_batch(
        losses_local.cpc_infonce,
        mesh,
        targets=jnp.asarray(targets(config), jnp.int32),
        temperature=config.cpc.temperature,
    )

    def loss_fn(params):
        out, new_stats = base.train_apply(model, params, state.batch_stats, x)
        loss, metrics = loss_fn_sharded(out["predictions"], out["patches"])
        linear = online_linear_metrics(out["logits"][:, None], labels)
        # Monitors compare two patches of each image (there are no views): first and last.
        embeddings = (out["patches"][:, 0], out["patches"][:, -1], out["features"])
        return loss + linear["linear_loss"], (loss, {**metrics, **linear}, new_stats, embeddings)

    return base.gradient_update(
        state, loss_fn, tx, schedule=schedule, config=config, total_steps=total_steps
    )


METHOD = base.register(
    base.Method(
        name="cpc",
        train_step=train_step,
        summary="CPC v2: masked context over a patch grid predicts rows below, InfoNCE",
        config_defaults=config_defaults,
        validate=validate,
        build_model=build_model,
    )
)
