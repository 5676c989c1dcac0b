"""A ViT encoder in torchvision's `VisionTransformer` `state_dict` layout (`export_torch`'s half).

torchvision's ViT is ours with the same numbers: pre-norm blocks, LayerNorm eps 1e-6, exact GELU,
a class token whose output is the feature and a position embedding over `[cls] + patches`. Keys:
`class_token`, `conv_proj.*`, `encoder.pos_embedding`, `encoder.layers.encoder_layer_{i}.{ln_1,
self_attention.{in_proj_weight,in_proj_bias,out_proj.*}, ln_2, mlp.0, mlp.3}.*`, `encoder.ln.*`
(no `heads.*`: the builder sets `heads = nn.Identity()`). ViT-B/16 and ViT-L/16 load into
`torchvision.models.vit_b_16` / `vit_l_16`; other sizes into the same `VisionTransformer` class
with their widths. A sin-cos embedding is written as the fixed table it is (torchvision holds it
as a parameter); a `pool='gap'` encoder is refused: torchvision's ViT reads the class token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from simclr_jax.models.vit import parse_variant, posemb_sincos_2d

# torchvision constructors whose architecture equals a ViT variant of ours.
_TORCHVISION_NAMES = {"B/16": "vit_b_16", "L/16": "vit_l_16"}


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


def _linear(dense: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """Flax Dense (kernel [in, out]) -> torch Linear `weight` [out, in] and `bias`."""
    return {
        f"{prefix}.weight": _f32(np.asarray(dense["kernel"]).T),
        f"{prefix}.bias": _f32(dense["bias"]),
    }


def _layer_norm(ln: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.weight": _f32(ln["scale"]), f"{prefix}.bias": _f32(ln["bias"])}


def _attention(mha: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """Flax MultiHeadDotProductAttention -> torch MultiheadAttention (q, k, v stacked)."""
    d = np.shape(mha["query"]["kernel"])[0]
    # query/key/value kernels are [D, heads, head_dim]: as Linear weights [heads*head_dim, D].
    qkv = [np.asarray(mha[n]["kernel"]).reshape(d, -1).T for n in ("query", "key", "value")]
    bias = [np.asarray(mha[n]["bias"]).reshape(-1) for n in ("query", "key", "value")]
    out = np.asarray(mha["out"]["kernel"])  # [heads, head_dim, D]
    return {
        f"{prefix}.in_proj_weight": _f32(np.concatenate(qkv, axis=0)),
        f"{prefix}.in_proj_bias": _f32(np.concatenate(bias)),
        f"{prefix}.out_proj.weight": _f32(out.reshape(-1, out.shape[-1]).T),
        f"{prefix}.out_proj.bias": _f32(mha["out"]["bias"]),
    }


def check_exportable(model: Mapping[str, Any], export_path: str) -> None:
    """Refuses a ViT torchvision's VisionTransformer cannot hold (mean-pooled features)."""
    if model.get("pool", "tok") != "tok":
        raise ValueError(
            f"{export_path} holds a ViT with model.pool={model['pool']!r}; torchvision's "
            "VisionTransformer pools the class token only, so it cannot be exported (pool='tok')"
        )


def vit_state_dict(params: Mapping[str, Any], model: Mapping[str, Any], image_size: int) -> dict:
    """Flax ViT params -> torchvision `VisionTransformer` `state_dict` (numpy, no `heads.*`)."""
    kernel = np.asarray(params["embedding"]["kernel"])  # [p, p, 3, D]
    out = {
        "class_token": _f32(params["cls"]),
        "conv_proj.weight": _f32(np.transpose(kernel, (3, 2, 0, 1))),
        "conv_proj.bias": _f32(params["embedding"]["bias"]),
    }
    if "pos_embedding" in params:
        out["encoder.pos_embedding"] = _f32(params["pos_embedding"])
    else:  # sin-cos: the fixed table, with the class token's zero row
        g, d = image_size // kernel.shape[0], kernel.shape[-1]
        table = posemb_sincos_2d(g, g, d)
        out["encoder.pos_embedding"] = _f32(np.concatenate([np.zeros((1, d)), table])[None])
    t = params["Transformer"]
    depth = sum(1 for k in t if k.startswith("encoderblock_"))
    for i in range(depth):
        b, pre = t[f"encoderblock_{i}"], f"encoder.layers.encoder_layer_{i}"
        out.update(_layer_norm(b["LayerNorm_0"], f"{pre}.ln_1"))
        out.update(_attention(b["MultiHeadDotProductAttention_0"], f"{pre}.self_attention"))
        out.update(_layer_norm(b["LayerNorm_1"], f"{pre}.ln_2"))
        out.update(_linear(b["MlpBlock_0"]["Dense_0"], f"{pre}.mlp.0"))
        out.update(_linear(b["MlpBlock_0"]["Dense_1"], f"{pre}.mlp.3"))
    out.update(_layer_norm(t["encoder_norm"], "encoder.ln"))
    return out


def vit_image_size(model: Mapping[str, Any], params: Mapping[str, Any], default: Any) -> int:
    """The image side torchvision's ViT is built for (it takes no other): the learned
    embedding's grid x the patch, else `default` (the pretraining's `augment.image_size`)."""
    patch = parse_variant(model["variant"])[1]
    if "pos_embedding" in params:
        return math.isqrt(np.shape(params["pos_embedding"])[1] - 1) * patch
    if not default:
        raise ValueError(
            "a sin-cos ViT export must state its image size (source.config.augment.image_size "
            "in export.json): torchvision's VisionTransformer is built for one size"
        )
    return int(default)


def torch_vit_spec(model: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """The torchvision build recipe (`model.json['torchvision']`) for a ViT export."""
    (width, depth, mlp_dim, heads), patch = parse_variant(model["variant"])
    return {
        "constructor": _TORCHVISION_NAMES.get(model["variant"], "VisionTransformer"),
        "image_size": int(image_size),
        "patch_size": patch,
        "num_layers": depth,
        "num_heads": heads,
        "hidden_dim": width,
        "mlp_dim": mlp_dim,
        "feature_dim": width,
        "posemb": model.get("posemb", "learn"),
    }


def build_torchvision_vit(spec: Mapping[str, Any]) -> Any:
    """torchvision `VisionTransformer` for a `torch_vit_spec`, `heads` = `nn.Identity`."""
    import torch.nn as nn
    import torchvision

    if spec["constructor"] != "VisionTransformer":
        model = getattr(torchvision.models, spec["constructor"])(
            weights=None, image_size=spec["image_size"]
        )
    else:
        model = torchvision.models.VisionTransformer(
            image_size=spec["image_size"],
            patch_size=spec["patch_size"],
            num_layers=spec["num_layers"],
            num_heads=spec["num_heads"],
            hidden_dim=spec["hidden_dim"],
            mlp_dim=spec["mlp_dim"],
        )
    model.heads = nn.Identity()
    return model
