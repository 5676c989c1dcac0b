"""Flax models: ResNet encoders, projection head, online linear head and their composition."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.heads import LinearHead, Predictor, ProjectionHead
from simclr_jax.models.resnet import (
    COMPATS,
    RESNET_LAYOUTS,
    STEMS,
    ResNet,
    feature_dim,
    resnet,
)

__all__ = [
    "COMPATS",
    "LinearHead",
    "Predictor",
    "ProjectionHead",
    "RESNET_LAYOUTS",
    "STEMS",
    "ResNet",
    "SimCLRModel",
    "create_head",
    "create_model",
    "feature_dim",
    "init_variables",
    "resnet",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class SimCLRModel(nn.Module):
    """Encoder + projection head + online linear head.

    Returns `{'features', 'projection', 'head_outputs', 'logits'}`: pooled encoder features, the
    final projection (fp32, used by the contrastive loss), every head layer's output, and the
    linear head's logits on stop-gradient features; with a `predictor` (BYOL, SimSiam) also
    `'prediction'`, the predictor's output on the projection.
    """

    encoder: ResNet
    head: ProjectionHead
    num_classes: int
    predictor: Predictor | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> dict[str, Any]:
        features = self.encoder(x, train=train)
        head_outputs = self.head(features, train=train)
        logits = LinearHead(self.num_classes, name="linear_head")(features)
        out = {
            "features": features,
            "projection": head_outputs[-1],
            "head_outputs": head_outputs,
            "logits": logits,
        }
        if self.predictor is not None:
            out["prediction"] = self.predictor(head_outputs[-1], train=train)
        return out


def compute_dtype(name: str) -> Any:
    """Maps a config dtype name to the jnp dtype; clear error on anything else."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def create_encoder(model_config: Any, conv: Callable[..., Any] | None = None) -> ResNet:
    """Builds the ResNet encoder described by `config.model`.

    `conv`: the convolution primitive (None: `lax.conv_general_dilated`); a run passes its
    backend's (`runtime.cpu_conv.for_backend()`), the architecture and params are the same.
    """
    return resnet(
        model_config.depth,
        width_multiplier=model_config.width_multiplier,
        stem=model_config.stem,
        base_width=model_config.base_width,
        zero_init_last_bn=model_config.zero_init_last_bn,
        dtype=compute_dtype(model_config.dtype),
        sk_ratio=float(model_config.sk_ratio),
        compat=model_config.compat,
        conv_general_dilated=conv,
    )


def create_head(
    model_config: Any,
    out_scale: bool = True,
    num_used: int | None = None,
) -> ProjectionHead:
    """The projection head `model_config` describes (its first `num_used` layers, or all)."""
    return ProjectionHead(
        num_layers=model_config.head_layers,
        num_used=num_used,
        hidden_dim=model_config.head_hidden_dim,
        out_dim=model_config.head_out_dim,
        use_bn=model_config.head_bn,
        out_scale=out_scale,
        dtype=compute_dtype(model_config.dtype),
    )


def create_model(
    config: Any,
    num_classes: int,
    predictor: Predictor | None = None,
    head_out_scale: bool = True,
    conv: Callable[..., Any] | None = None,
) -> SimCLRModel:
    """Builds the SimCLR model from a run config's `config.model`, with an optional predictor.

    `head_out_scale=False`: the projection head's last BN has no scale (SimSiam).
    """
    m = config.model
    if m.head_layers < 1:
        raise ValueError(f"model.head_layers={m.head_layers!r} must be >= 1 (2: SimCLRv1, 3: v2)")
    return SimCLRModel(
        encoder=create_encoder(m, conv),
        head=create_head(m, head_out_scale),
        num_classes=num_classes,
        predictor=predictor,
    )


def head_out_scale(model_config: Any, head_params: Any) -> bool:
    """Whether a trained projection head's last BN has a scale (SimSiam's has none)."""
    return not model_config.head_bn or "scale" in head_params.get(
        f"bn{model_config.head_layers}", {}
    )


def init_variables(model: Any, key: jax.Array, image_size: int) -> dict[str, Any]:
    """Initialises model variables from a dummy batch of the training image size."""
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    return model.init(key, dummy, train=False)
