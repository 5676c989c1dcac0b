"""Export an encoder to PyTorch: torchvision ResNet or ViT `state_dict` + projection head.

    python -m simclr_jax.main --config=configs/digits.py --workdir=runs/digits --mode=export_torch

reads `runs/digits/export/` (or `--config.init_from`) and writes `runs/digits/export_torch/`:

* `encoder.safetensors`: exactly the keys, shapes and layouts of torchvision's `resnet*`
  `state_dict` without `fc.*` (conv kernels OIHW, BatchNorm `weight/bias/running_mean/
  running_var/num_batches_tracked`), so `model.fc = nn.Identity()` then
  `model.load_state_dict(..., strict=True)` loads it; a ViT: torchvision's `VisionTransformer`
  keys without `heads.*` (`export_torch_vit`);
* `projection_head.safetensors`: `dense{i}` (`nn.Linear`) and `bn{i}` (`nn.BatchNorm1d`) keys;
* `model.json`: which torchvision model to build (`build_torchvision` does it).

Writing needs only numpy and `safetensors` (requirements-torch.txt); torch and torchvision are
imported only by the `build_*` functions, so the JAX side never pays for them.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from simclr_jax.interop import export_torch_vit
from simclr_jax.models import encoder_feature_dim, encoder_name
from simclr_jax.models.resnet import RESNET_LAYOUTS, feature_dim
from simclr_jax.runtime import files

EXPORT_TORCH_FORMAT_VERSION = 1
ENCODER_FILE = "encoder.safetensors"
HEAD_FILE = "projection_head.safetensors"
MODEL_FILE = "model.json"
INSTALL_HINT = "pip install -r requirements-torch.txt  (torch, torchvision, safetensors)"

# torchvision constructors whose architecture equals ours at width 1, base width 64, ImageNet stem.
_TORCHVISION_NAMES = {
    18: "resnet18",
    34: "resnet34",
    50: "resnet50",
    101: "resnet101",
    152: "resnet152",
}
_BLOCK_NAMES = {"basic": "BasicBlock", "bottleneck": "Bottleneck"}


def _import_error(what: str, e: ImportError) -> ImportError:
    """An ImportError that says what to install."""
    return ImportError(
        f"{what} needs PyTorch packages that are not installed ({e}); {INSTALL_HINT}"
    )


def _conv(kernel: Any) -> np.ndarray:
    """Flax conv kernel HWIO -> torch OIHW."""
    return np.ascontiguousarray(np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1)))


def _bn(
    params: Mapping[str, Any], stats: Mapping[str, Any], num_batches: int
) -> dict[str, np.ndarray]:
    """Flax BatchNorm (scale, bias, mean, var) -> torch BatchNorm keys.

    A Flax BN built without scale or bias (the head's last BN has no shift) gets the identity
    value, which is what it computes.
    """
    f32 = np.float32
    features = np.shape(stats["mean"])[0]
    return {
        "weight": np.asarray(params.get("scale", np.ones(features, f32)), f32),
        "bias": np.asarray(params.get("bias", np.zeros(features, f32)), f32),
        "running_mean": np.asarray(stats["mean"], f32),
        "running_var": np.asarray(stats["var"], f32),
        # torch only reads it when momentum=None (cumulative average); the step is informative.
        "num_batches_tracked": np.asarray(num_batches, np.int64),
    }


def _prefixed(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds `prefix.` to every key."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def encoder_state_dict(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], depth: int, num_batches: int = 0
) -> dict[str, np.ndarray]:
    """Flax ResNet variables -> torchvision ResNet `state_dict` (numpy, without `fc.*`)."""
    if depth not in RESNET_LAYOUTS:
        raise ValueError(
            f"ResNet depth={depth!r} is not supported; allowed: {sorted(RESNET_LAYOUTS)}"
        )
    block, stages = RESNET_LAYOUTS[depth]
    convs = ("conv1", "conv2") if block == "basic" else ("conv1", "conv2", "conv3")

    names = {f"stage{i + 1}_block{j + 1}" for i, n in enumerate(stages) for j in range(n)}
    if set(params) != names | {"stem_conv", "stem_bn"}:
        raise ValueError(
            f"the encoder's parameter groups {sorted(params)} are not those of a ResNet-{depth} "
            f"(stages {stages}); is model.depth in export.json right?"
        )
    out = {"conv1.weight": _conv(params["stem_conv"]["kernel"])}
    out.update(_prefixed("bn1", _bn(params["stem_bn"], batch_stats["stem_bn"], num_batches)))
    for i, num_blocks in enumerate(stages):
        for j in range(num_blocks):
            name = f"stage{i + 1}_block{j + 1}"
            p, s = params[name], batch_stats[name]
            prefix = f"layer{i + 1}.{j}"
            for k, conv in enumerate(convs):
                out[f"{prefix}.{conv}.weight"] = _conv(p[conv]["kernel"])
                bn = f"bn{k + 1}"
                out.update(_prefixed(f"{prefix}.{bn}", _bn(p[bn], s[bn], num_batches)))
            if "downsample_conv" in p:
                out[f"{prefix}.downsample.0.weight"] = _conv(p["downsample_conv"]["kernel"])
                ds = _bn(p["downsample_bn"], s["downsample_bn"], num_batches)
                out.update(_prefixed(f"{prefix}.downsample.1", ds))
    return out


def head_state_dict(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], num_batches: int = 0
) -> dict[str, np.ndarray]:
    """Flax ProjectionHead variables -> `dense{i}.weight[/bias]`, `bn{i}.*` torch tensors."""
    out: dict[str, np.ndarray] = {}
    num_layers = sum(1 for k in params if k.startswith("dense"))
    for i in range(1, num_layers + 1):
        dense = params[f"dense{i}"]
        # Flax Dense kernel is [in, out]; torch Linear weight is [out, in].
        out[f"dense{i}.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T)
        if "bias" in dense:
            out[f"dense{i}.bias"] = np.asarray(dense["bias"], np.float32)
        if f"bn{i}" in batch_stats:
            bn = _bn(params.get(f"bn{i}", {}), batch_stats[f"bn{i}"], num_batches)
            out.update(_prefixed(f"bn{i}", bn))
    return out


def torch_model_spec(model: Mapping[str, Any]) -> dict[str, Any]:
    """The torchvision build recipe (`model.json['torchvision']`) for an export's model dict."""
    depth, width = int(model["depth"]), int(model["width_multiplier"])
    base_width, stem = int(model["base_width"]), model["stem"]
    block, stages = RESNET_LAYOUTS[depth]
    standard = depth in _TORCHVISION_NAMES and width == 1 and base_width == 64
    return {
        # 'resnet50' etc. when torchvision has the exact model, else the generic ResNet class.
        "constructor": _TORCHVISION_NAMES[depth] if standard else "ResNet",
        "block": _BLOCK_NAMES[block],
        "layers": list(stages),
        # channels of the stem and layer1; layer i has stem_width * 2**(i-1) (x4 for Bottleneck)
        "stem_width": base_width * width,
        "stem": stem,
        "feature_dim": feature_dim(depth, width, base_width),
    }


def _head_spec(model: Mapping[str, Any]) -> dict[str, Any]:
    """Projection head shape for `model.json['projection_head']`."""
    return {
        "num_layers": int(model["head_layers"]),
        "in_dim": encoder_feature_dim(model),
        "hidden_dim": int(model["head_hidden_dim"]),
        "out_dim": int(model["head_out_dim"]),
        "use_bn": bool(model["head_bn"]),
        "out_scale": bool(model["head_out_scale"]),
    }


def _check_torchvision_layout(model: Mapping[str, Any], export_path: str) -> None:
    """Refuses encoders torchvision cannot hold; notes where it computes slightly differently."""
    if float(model["sk_ratio"]) > 0:
        raise ValueError(
            f"{export_path} holds a selective-kernel ResNet (model.sk_ratio="
            f"{model['sk_ratio']}); torchvision has no SK-ResNet layout, so it cannot be exported "
            "to a torchvision state_dict (use the JAX export, or a plain sk_ratio=0 model)"
        )
    if model.get("norm", "batch") != "batch" or int(model.get("patch_grid", 0) or 0):
        raise ValueError(
            f"{export_path} holds a ResNet with model.norm={model.get('norm')!r} / "
            f"model.patch_grid={model.get('patch_grid')!r} (CPC's); torchvision's resnet has "
            "BatchNorm on whole images only, so it cannot be exported (use the JAX export)"
        )
    if model["compat"] == "simclr_tf":
        if RESNET_LAYOUTS[int(model["depth"])][0] == "basic":
            raise ValueError(
                f"{export_path} is a ResNet-{model['depth']} in google-research/simclr's layout "
                "(a projection shortcut in layer1.0) that torchvision's resnet cannot hold"
            )
        print(
            f"note: {export_path} follows google-research/simclr's TF layout; torchvision's stem "
            "max-pool pads (1, 1) where TF pads (0, 1), so its features differ slightly from "
            "the JAX/TF ones on even-sized stem maps (e.g. 224 px inputs)"
        )


def export_torch(export_path: str, out_dir: str | None = None) -> dict[str, str]:
    """Converts an export (`checkpoint.export_encoder`) to PyTorch files in `out_dir`.

    `out_dir` defaults to `export_torch/` beside the export folder. Returns the written paths as
    `{'encoder', 'projection_head', 'model'}`.
    """
    from simclr_jax import checkpoint

    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise _import_error("--mode=export_torch", e) from e
    export_path = os.path.abspath(export_path)
    out_dir = os.path.abspath(out_dir or os.path.join(os.path.dirname(export_path), "export_torch"))
    variables, meta = checkpoint.load_export(export_path)
    model = meta["model"]
    step = int(meta.get("source", {}).get("step", 0))
    params, stats = variables["params"], variables.get("batch_stats", {})
    image_size = meta.get("source", {}).get("config", {}).get("augment", {}).get("image_size")
    if encoder_name(model) == "text":
        raise ValueError(
            f"{export_path} holds a text encoder (model.name='text'); --mode=export_torch writes "
            "torchvision's ResNet and ViT layouts only (use the JAX export and its tokenizer.json)"
        )
    if encoder_name(model) == "vit":
        export_torch_vit.check_exportable(model, export_path)
        image_size = export_torch_vit.vit_image_size(model, params["encoder"], image_size)
        encoder = export_torch_vit.vit_state_dict(params["encoder"], model, image_size)
        spec = export_torch_vit.torch_vit_spec(model, image_size)
    else:
        _check_torchvision_layout(model, export_path)
        depth = int(model["depth"])
        encoder = encoder_state_dict(params["encoder"], stats["encoder"], depth, step)
        spec = torch_model_spec(model)
    head = head_state_dict(params.get("head", {}), stats.get("head", {}), step)
    description = {
        "format_version": EXPORT_TORCH_FORMAT_VERSION,
        "torchvision": spec,
        "projection_head": _head_spec(model),
        # The encoder saw float RGB in [0, 1] without mean/std normalisation, NHWC in JAX.
        "input": {
            "layout": "NCHW",
            "range": [0.0, 1.0],
            "normalize": None,
            "image_size": image_size,
        },
        "model": model,
        "source": {"export": export_path, "step": step},
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "encoder": os.path.join(out_dir, ENCODER_FILE),
        "projection_head": os.path.join(out_dir, HEAD_FILE),
        "model": os.path.join(out_dir, MODEL_FILE),
    }
    file_meta = {"format": "pt", "source": export_path}
    files.write_atomic(paths["encoder"], lambda p: save_file(encoder, p, metadata=file_meta))
    files.write_atomic(paths["projection_head"], lambda p: save_file(head, p, metadata=file_meta))
    files.write_json_atomic(paths["model"], description, indent=2, sort_keys=True)
    return paths


def _spec(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The torchvision recipe from `model.json`, `export.json` or a bare model dict."""
    if "torchvision" in meta:
        return meta["torchvision"]
    return torch_model_spec(meta["model"] if "model" in meta else meta)


def build_torchvision(meta: Mapping[str, Any]) -> Any:
    """The torchvision encoder (ResNet or ViT) `meta` describes, returning pooled features."""
    spec = meta.get("torchvision", {})
    if "hidden_dim" in spec:
        try:
            return export_torch_vit.build_torchvision_vit(spec)
        except ImportError as e:
            raise _import_error("build_torchvision", e) from e
    return build_torchvision_resnet(meta)


def build_torchvision_resnet(meta: Mapping[str, Any]) -> Any:
    """torchvision ResNet matching an export, `fc` replaced by `nn.Identity` (returns features).

    `meta` is `model.json` (or `export.json`, or its `model` dict). Standard depths at width 1
    use `torchvision.models.resnet*`; otherwise the `ResNet` class is rebuilt with our widths
    and, for the CIFAR stem, a 3x3/1 `conv1` and no max-pool.
    """
    try:
        import torch.nn as nn
        import torchvision
    except ImportError as e:
        raise _import_error("build_torchvision_resnet", e) from e
    spec = _spec(meta)
    tvr = torchvision.models.resnet
    if spec["constructor"] != "ResNet":
        model = getattr(torchvision.models, spec["constructor"])(weights=None)
    else:
        block = getattr(tvr, spec["block"])
        model = tvr.ResNet(block, list(spec["layers"]))
        # torchvision hard-codes 64 stem channels; rebuild the stem and the stages at our width.
        # (Its width_per_group widens only a Bottleneck's 3x3, not what SimCLR's multiplier does.)
        w = int(spec["stem_width"])
        model.inplanes = w
        model.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(w)
        model.layer1 = model._make_layer(block, w, spec["layers"][0])
        model.layer2 = model._make_layer(block, 2 * w, spec["layers"][1], stride=2)
        model.layer3 = model._make_layer(block, 4 * w, spec["layers"][2], stride=2)
        model.layer4 = model._make_layer(block, 8 * w, spec["layers"][3], stride=2)
    if spec["stem"] == "cifar":
        w = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def build_projection_head(meta: Mapping[str, Any]) -> Any:
    """`nn.Sequential` of `dense{i}`/`bn{i}`/`relu{i}` matching `projection_head.safetensors`.

    The last BatchNorm's bias is loaded as zeros and frozen: the JAX head has no shift there
    (nor a scale when `out_scale` is False, SimSiam's: its weight is ones and frozen too).
    """
    try:
        import torch.nn as nn
    except ImportError as e:
        raise _import_error("build_projection_head", e) from e
    spec = meta["projection_head"] if "projection_head" in meta else _head_spec(meta["model"])
    layers: list[tuple[str, Any]] = []
    dim = spec["in_dim"]
    for i in range(1, spec["num_layers"] + 1):
        last = i == spec["num_layers"]
        out = spec["out_dim"] if last else spec["hidden_dim"]
        layers.append((f"dense{i}", nn.Linear(dim, out, bias=not spec["use_bn"])))
        if spec["use_bn"]:
            bn = nn.BatchNorm1d(out)
            if last:
                bn.bias.requires_grad_(False)
                if not spec.get("out_scale", True):
                    bn.weight.requires_grad_(False)
            layers.append((f"bn{i}", bn))
        if not last:
            layers.append((f"relu{i}", nn.ReLU()))
        dim = out
    return nn.Sequential(OrderedDict(layers))


def load_torch(out_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    """Builds and loads (strict) the encoder and head written by `export_torch`, in eval mode."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise _import_error("load_torch", e) from e
    with open(os.path.join(out_dir, MODEL_FILE)) as f:
        meta = json.load(f)
    encoder = build_torchvision(meta)
    encoder.load_state_dict(load_file(os.path.join(out_dir, ENCODER_FILE)), strict=True)
    head = build_projection_head(meta)
    head.load_state_dict(load_file(os.path.join(out_dir, HEAD_FILE)), strict=True)
    return encoder.eval(), head.eval(), meta
