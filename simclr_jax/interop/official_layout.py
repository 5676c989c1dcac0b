"""Where each variable of google-research/simclr's ResNets and heads lives, in TF and in ours.

The official TF2 code (`tf2/resnet.py`, `tf2/model.py`) names a variable by its Keras attribute
path, e.g. `resnet_model/block_groups/1/layers/0/projection_layers/2/conv2d/kernel`; the TF1 code
(`resnet.py`, `model_util.py`) by creation order, `base_model/conv2d_17/kernel`. `encoder_entries`
lists a ResNet's convolutions and BNs in that creation order with both names; heads are found by
name. No TensorFlow is needed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from simclr_jax.checkpoint import CheckpointError
from simclr_jax.models.resnet import RESNET_LAYOUTS, SK_MIN_DIM, feature_dim

BN_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
SIMCLR_V2_SK_RATIO = 0.0625
_RN = "resnet_model"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One conv / BN / dense layer: our variable path and its TF2 (or head) checkpoint name."""

    kind: str  # 'conv', 'bn' or 'dense'
    ours: tuple[str, ...]
    tf2: str
    bias: bool = True  # BN: has beta (center); dense: has a bias
    filters: int = 0  # SK mixing conv fc1: the block's filters, in units of the stem width
    sk_fc1: bool = False


def _conv(ours: tuple[str, ...], tf2: str, **kw: Any) -> Entry:
    return Entry("conv", ours, tf2, bias=False, **kw)


def _bn(ours: tuple[str, ...], tf2: str) -> Entry:
    return Entry("bn", ours, tf2)


def encoder_entries(arch: dict[str, Any]) -> list[Entry]:
    """The encoder's layers in the official graph's creation order (projection shortcut first)."""
    sk, stem = arch["sk"], arch["stem"]
    pre = f"{_RN}/initial_conv_relu_max_pool"
    if stem == "cifar":
        out = [_conv(("stem_conv",), f"{pre}/0/conv2d"), _bn(("stem_bn",), f"{pre}/2/bn")]
    elif sk:  # ResNet-D stem: conv, bn, conv, bn, conv, identity, bn, max-pool
        out = [
            _conv(("stem_conv1",), f"{pre}/0/conv2d"),
            _bn(("stem_bn1",), f"{pre}/1/bn"),
            _conv(("stem_conv2",), f"{pre}/2/conv2d"),
            _bn(("stem_bn2",), f"{pre}/3/bn"),
            _conv(("stem_conv",), f"{pre}/4/conv2d"),
            _bn(("stem_bn",), f"{pre}/6/bn"),
        ]
    else:
        out = [_conv(("stem_conv",), f"{pre}/0/conv2d"), _bn(("stem_bn",), f"{pre}/2/bn")]
    bottleneck = arch["block"] == "bottleneck"
    for g, num_blocks in enumerate(arch["stages"]):
        for j in range(num_blocks):
            ours = f"stage{g + 1}_block{j + 1}"
            tf = f"{_RN}/block_groups/{g}/layers/{j}"
            if j == 0:  # ResNet-D: [fixed padding,] avg-pool, conv, bn; else conv, bn
                proj = f"{tf}/{'projection_layers' if bottleneck else 'shortcut_layers'}"
                at = (2 if g > 0 else 1) if sk else 0
                out.append(_conv((ours, "downsample_conv"), f"{proj}/{at}/conv2d"))
                out.append(_bn((ours, "downsample_bn"), f"{proj}/{at + 1}/bn"))
            if not bottleneck:  # conv, bn, conv, bn
                main = f"{tf}/conv2d_bn_layers"
                out += [
                    _conv((ours, "conv1"), f"{main}/0/conv2d"),
                    _bn((ours, "bn1"), f"{main}/1/bn"),
                    _conv((ours, "conv2"), f"{main}/2/conv2d"),
                    _bn((ours, "bn2"), f"{main}/3/bn"),
                ]
                continue
            # conv, bn, dropblock, (conv, bn | SK), dropblock, conv, bn, dropblock
            main = f"{tf}/conv_relu_dropblock_layers"
            out += [_conv((ours, "conv1"), f"{main}/0/conv2d"), _bn((ours, "bn1"), f"{main}/1/bn")]
            if sk:
                skp, sko = f"{main}/3", (ours, "sk_conv2")
                out += [
                    _conv(sko + ("conv",), f"{skp}/conv2d_fixed_padding/conv2d"),
                    _bn(sko + ("bn",), f"{skp}/batch_norm_relu/bn"),
                    _conv(sko + ("fc1",), f"{skp}/conv2d_0", filters=2**g, sk_fc1=True),
                    _bn(sko + ("fc1_bn",), f"{skp}/batch_norm_relu_1/bn"),
                    _conv(sko + ("fc2",), f"{skp}/conv2d_1"),
                ]
                last = 5
            else:
                out += [
                    _conv((ours, "conv2"), f"{main}/3/conv2d"),
                    _bn((ours, "bn2"), f"{main}/4/bn"),
                ]
                last = 6
            out += [
                _conv((ours, "conv3"), f"{main}/{last}/conv2d"),
                _bn((ours, "bn3"), f"{main}/{last + 1}/bn"),
            ]
    return out


def _depth(block: str, stages: tuple[int, ...], path: str) -> int:
    for depth, (kind, layout) in RESNET_LAYOUTS.items():
        if kind == block and tuple(layout) == stages:
            return depth
    raise CheckpointError(
        f"{path}: a ResNet with {block} blocks {list(stages)} per stage is not supported; "
        f"supported depths: {sorted(RESNET_LAYOUTS)}"
    )


def infer_arch_tf2(shapes: dict[str, tuple[int, ...]], path: str) -> dict[str, Any]:
    """Depth, block kind, stem and SK-ness from a TF2 checkpoint's variable paths."""
    pre = f"{_RN}/initial_conv_relu_max_pool/"
    stem = sorted(n for n in shapes if n.startswith(pre) and n.endswith("/conv2d/kernel"))
    if not stem:
        raise CheckpointError(
            f"{path}: no model/{pre}... variables, so it is not a google-research/simclr TF2 "
            "checkpoint (a tf2/run.py ckpt-N or a simclr-checkpoints-tf2 SavedModel)"
        )
    names = [n for n in shapes if n.startswith(f"{_RN}/block_groups/")]
    bottleneck = any("/conv_relu_dropblock_layers/" in n for n in names)
    stages = []
    for g in range(4):
        blocks = {n.split("/")[4] for n in names if n.split("/")[2] == str(g)}
        stages.append(len(blocks))
    block = "bottleneck" if bottleneck else "basic"
    if bottleneck:
        sk = any(n.endswith("/conv2d_0/kernel") for n in names)
    else:
        sk = f"{_RN}/block_groups/0/layers/0/shortcut_layers/1/conv2d/kernel" in shapes
    if len(stem) == 3:
        kind = "imagenet"
    else:
        kind = "imagenet" if shapes[stem[0]][0] == 7 else "cifar"
    depth = _depth(block, tuple(stages), path)
    return {"block": block, "stages": tuple(stages), "depth": depth, "stem": kind, "sk": sk}


def arch_candidates_tf1(shapes: dict[str, tuple[int, ...]], path: str) -> list[dict[str, Any]]:
    """TF1 layouts that may fit (layer counts and shapes decide), from the stem's convs."""
    first = shapes.get("base_model/conv2d/kernel")
    if first is None:
        raise CheckpointError(
            f"{path}: no base_model/conv2d/kernel, so it is not a google-research/simclr "
            "checkpoint (TF1 model.ckpt-N, or TF2 ckpt-N / SavedModel)"
        )
    second = shapes.get("base_model/conv2d_1/kernel")
    if first[0] == 7:
        stems = [("imagenet", False)]
    elif second is not None and tuple(second) == (3, 3, first[3], first[3]):
        stems = [("imagenet", True)]
    else:  # the official TF1 basic block with SK cannot downsample, so plain comes first
        stems = [("cifar", False), ("cifar", True)]
    return [
        {"block": block, "stages": tuple(stages), "depth": depth, "stem": stem, "sk": sk}
        for stem, sk in stems
        for depth, (block, stages) in RESNET_LAYOUTS.items()
    ]


def infer_sk_ratio(mids: list[tuple[int, int]], path: str) -> float:
    """The sk_ratio giving every SK mixing width `max(int(filters * r), 32)` seen."""
    ratios = [SIMCLR_V2_SK_RATIO] + sorted({m / f for f, m in mids if m > SK_MIN_DIM})
    for r in ratios:
        if all(max(int(f * r), SK_MIN_DIM) == m for f, m in mids):
            return r
    raise CheckpointError(
        f"{path}: the SK mixing widths {sorted({m for _, m in mids})} fit no sk_ratio "
        f"(width = max(int(filters * sk_ratio), {SK_MIN_DIM})); cannot map this architecture"
    )


def model_config_for(arch: dict[str, Any], width: int, sk_ratio: float) -> dict[str, Any]:
    """Our `config.model` keys for an official encoder whose stem has `width` channels."""
    # Official widths are 64 x width_multiplier; a narrower (test-sized) net keeps multiplier 1.
    multiplier, base = (width // 64, 64) if width % 64 == 0 else (1, width)
    return {
        "name": "resnet",  # google-research/simclr released ResNets only
        "depth": arch["depth"],
        "width_multiplier": multiplier,
        "base_width": base,
        "stem": arch["stem"],
        "sk_ratio": float(sk_ratio),
        "compat": "simclr_tf",
        "zero_init_last_bn": False,
        "dtype": "float32",
    }


def head_entries(
    fmt: str, shapes: dict[str, tuple[int, ...]], model: dict[str, Any], path: str
) -> tuple[dict[str, list[Entry]], dict[str, Any]]:
    """`({'head': ..., 'linear_head': ...}, config keys)` for the heads the checkpoint holds."""
    feat = feature_dim(model["depth"], model["width_multiplier"], model["base_width"])
    out: dict[str, list[Entry]] = {}
    if fmt == "tf2":
        layer = "_projection_head/linear_layers/{}"
        dense, bn = layer + "/dense", layer + "/bn_relu/bn"
        sup = "supervised_head/linear_layer/dense"
    else:
        linear = "head_contrastive/l_0/dense/kernel" in shapes
        layer = "head_contrastive/l_{}" if linear else "head_contrastive/nl_{}"
        dense, bn = layer + "/dense", layer + "/batch_normalization"
        sup = "head_supervised/linear_layer/dense"
    n = 0
    while f"{dense.format(n)}/kernel" in shapes:
        n += 1
    entries, dims = [], []
    for j in range(n):
        kernel = shapes[f"{dense.format(j)}/kernel"]
        dims.append(tuple(kernel))
        if f"{bn.format(j)}/gamma" not in shapes:
            raise CheckpointError(
                f"{path}: projection head layer {j} has no BN ({bn.format(j)}/gamma); only the "
                "official BN heads are supported"
            )
        entries.append(Entry("dense", (f"dense{j + 1}",), dense.format(j), bias=False))
        entries.append(_bn((f"bn{j + 1}",), bn.format(j)))
        if j == n - 1:  # the last BN has no shift (center=False)
            entries[-1] = Entry("bn", (f"bn{j + 1}",), bn.format(j), bias=False)
    if n:
        hidden = dims[0][1] if n > 1 else feat
        chain = [feat] + [hidden] * (n - 1) + [dims[-1][1]]
        if [d[0] for d in dims] + [dims[-1][1]] != chain:
            raise CheckpointError(
                f"{path}: projection head layer shapes {dims} do not chain from the "
                f"{feat}-dim features through equal hidden widths; cannot map this head"
            )
        info = {"head_layers": n, "head_hidden_dim": hidden, "head_out_dim": dims[-1][1]}
        info["head_bn"] = True
        out["head"] = entries
    else:  # SimCLR v1 releases have no projection head
        info = {"head_layers": 0}
    if f"{sup}/kernel" in shapes:
        kernel = shapes[f"{sup}/kernel"]
        if kernel[0] != feat:
            raise CheckpointError(
                f"{path}: the supervised head takes {kernel[0]}-dim inputs, not the encoder's "
                f"{feat}-dim features (fine-tuned from a head layer?); cannot map it"
            )
        out["linear_head"] = [Entry("dense", ("dense",), sup)]
    return out, info
