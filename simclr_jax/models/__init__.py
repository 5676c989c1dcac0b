"""Flax models: ResNet, ViT and text encoders, projection head, online linear head, composition."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models import text
from simclr_jax.models.heads import LinearHead, Predictor, ProjectionHead
from simclr_jax.models.resnet import (
    COMPATS,
    NORMS,
    RESNET_LAYOUTS,
    STEMS,
    ResNet,
    feature_dim,
    resnet,
)
from simclr_jax.models.text import MlmHead, TextTransformer, build_text, check_text_config
from simclr_jax.models.vit import POOLS, POSEMBS, VIT_SIZES, ViT, build_vit, parse_variant

# config.model.name -> the encoder family (create_encoder builds any of them from config.model).
ENCODERS = ("resnet", "vit", "text")

__all__ = [
    "COMPATS",
    "NORMS",
    "ENCODERS",
    "POOLS",
    "POSEMBS",
    "LinearHead",
    "MlmHead",
    "Predictor",
    "ProjectionHead",
    "RESNET_LAYOUTS",
    "STEMS",
    "ResNet",
    "TextTransformer",
    "VIT_SIZES",
    "ViT",
    "SimCLRModel",
    "create_head",
    "create_model",
    "check_text_config",
    "dummy_input",
    "describe_encoder",
    "encoder_feature_dim",
    "encoder_label",
    "encoder_name",
    "feature_dim",
    "init_variables",
    "parse_variant",
    "build_text",
    "build_vit",
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

    encoder: ResNet | ViT
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


def encoder_name(model_config: Any) -> str:
    """`model_config.name` ('resnet' for configs and exports that predate the key)."""
    return model_config.get("name", "resnet")


def create_encoder(model_config: Any, conv: Callable[..., Any] | None = None) -> ResNet | ViT:
    """Builds the encoder described by `config.model`: a ResNet, or a ViT (`name='vit'`).

    `conv`: the ResNet's convolution primitive (None: `lax.conv_general_dilated`); a run passes
    its backend's (`runtime.cpu_conv.for_backend()`), the architecture and params are the same.
    A ViT has no convolution to swap (its patch embedding is a matmul).
    """
    patch = int(model_config.get("patch_grid", 0) or 0)
    if patch:  # CPC: the encoder on every patch of a grid, patch features mean-pooled
        import ml_collections  # only configs set a patch grid (the GPU image lacks it)

        from simclr_jax.models.patch_grid import PatchGridEncoder

        per_patch = ml_collections.ConfigDict({**dict(model_config), "patch_grid": 0})
        return PatchGridEncoder(
            create_encoder(per_patch, conv), patch, int(model_config.patch_grid_stride)
        )
    name = encoder_name(model_config)
    if name == "text":  # token ids -> sentence features (models/text.py)
        return build_text(
            model_config.variant,
            vocab_size=model_config.get("vocab_size", text.DEFAULT_VOCAB_SIZE),
            max_len=model_config.get("max_len", text.DEFAULT_MAX_LEN),
            pool=model_config.get("pool", "gap"),
            dtype=compute_dtype(model_config.dtype),
        )
    if name == "vit":
        return build_vit(
            model_config.variant,
            posemb=model_config.get("posemb", "learn"),
            pool=model_config.get("pool", "tok"),
            posemb_grid=model_config.get("posemb_grid", 0),
            dtype=compute_dtype(model_config.dtype),
        )
    if name != "resnet":
        raise ValueError(f"model.name={name!r} is not one of {list(ENCODERS)}")
    return resnet(
        model_config.depth,
        width_multiplier=model_config.width_multiplier,
        stem=model_config.stem,
        base_width=model_config.base_width,
        zero_init_last_bn=model_config.zero_init_last_bn,
        dtype=compute_dtype(model_config.dtype),
        sk_ratio=float(model_config.sk_ratio),
        compat=model_config.compat,
        norm_kind=model_config.get("norm", "batch"),
        conv_general_dilated=conv,
    )


def encoder_label(model_config: Any) -> str:
    """'ResNet-50', 'ViT-B/16', 'Text-S': the encoder's name for logs and reports."""
    if encoder_name(model_config) == "text":
        return f"Text-{model_config['variant']}"
    if encoder_name(model_config) == "vit":
        return f"ViT-{model_config['variant']}"
    return f"ResNet-{model_config['depth']}"


def encoder_feature_dim(model_config: Any) -> int:
    """Width of the pooled features of the encoder `model_config` describes."""
    m = model_config  # a ConfigDict or an export's plain dict
    if encoder_name(m) == "text":
        return text.text_size(m["variant"])[0]
    if encoder_name(m) == "vit":
        return parse_variant(m["variant"])[0][0]
    return feature_dim(int(m["depth"]), int(m["width_multiplier"]), int(m.get("base_width", 64)))


def describe_encoder(model_config: Any, encoder_params: Any) -> dict[str, Any]:
    """`model_config` as a dict, with what the trained encoder fixed that the config may not say.

    A learned ViT position embedding records its grid (`posemb_grid`, in patches): an export or
    a checkpoint evaluated at another image size resizes that grid (`vit.resample_posemb`).
    """
    out = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    if encoder_name(out) == "vit" and "pos_embedding" in encoder_params:
        n = encoder_params["pos_embedding"].shape[1] - (1 if "cls" in encoder_params else 0)
        out["posemb_grid"] = math.isqrt(n)
    return out


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


def dummy_input(model_config: Any, image_size: int) -> jax.Array:
    """A batch of 2 the encoder takes: zero token ids `[2, max_len]` (text), else images."""
    if model_config is not None and encoder_name(model_config) == "text":
        return jnp.zeros((2, model_config.get("max_len", text.DEFAULT_MAX_LEN)), jnp.int32)
    return jnp.zeros((2, image_size, image_size, 3), jnp.float32)


def init_variables(
    model: Any, key: jax.Array, image_size: int, model_config: Any = None
) -> dict[str, Any]:
    """Initialises model variables from a dummy batch (`dummy_input(model_config, image_size)`).

    Without `model_config` the dummy is an image batch of the training image size.
    """
    dummy = dummy_input(model_config, image_size)
    # 'batch_stats' always: a ViT with a BN-free head has none, and states keep the field.
    return {"batch_stats": {}, **model.init(key, dummy, train=False)}
