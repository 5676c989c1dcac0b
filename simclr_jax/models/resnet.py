"""ResNet v1.5 encoders (stride on the 3x3 conv) with ImageNet or CIFAR stems, and SimCLR v2's
selective-kernel ResNets (`sk_ratio > 0`, with the ResNet-D stem and shortcuts)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# SimCLR's TF code uses decay 0.9 and epsilon 1e-5; torchvision's eps is also 1e-5, so an
# exported encoder computes the same numbers in PyTorch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
STEMS = ("imagenet", "cifar")
# Which reference a ResNet's small layout details follow. 'torchvision': the stem max-pool pads 1
# on each side and a block projects its shortcut only when its shape changes (as torchvision, so
# exports match it). 'simclr_tf': google-research/simclr's TF ResNet, whose max-pool is TF 'SAME'
# (pads (0, 1) on even maps) and whose first block of every stage projects (ResNet-18/34's first
# stage too). Convolutions pad the same under both: TF's "fixed padding" of a strided conv is
# (k-1)//2 before and the rest after, equal to our symmetric k//2 for the odd kernels used here.
COMPATS = ("torchvision", "simclr_tf")
# 'batch': BatchNorm over the (global) batch; 'layer': each example's map normalised over its
# positions and channels (CPC v2's choice: patches of one image must not share statistics).
NORMS = ("batch", "layer")
SK_MIN_DIM = 32  # the official SK mixing MLP is never narrower than this


def _conv(
    features: int,
    kernel_size: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    *,
    name: str,
    dtype: Any = jnp.float32,
    conv_general_dilated: Callable[..., jnp.ndarray] | None = None,
) -> nn.Conv:
    """Bias-free conv with symmetric k//2 padding.

    Symmetric padding (not 'SAME', which pads (0, 1) for strided convs on even inputs) makes
    every strided conv sample the same pixels as torchvision's, so exported weights match.
    """
    pad = [(k // 2, k // 2) for k in kernel_size]
    return nn.Conv(
        features,
        kernel_size,
        strides,
        padding=pad,
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        conv_general_dilated=conv_general_dilated or jax.lax.conv_general_dilated,
        name=name,
    )


def _avg_pool_d(x: jnp.ndarray, strides: int) -> jnp.ndarray:
    """ResNet-D shortcut pooling as google-research/simclr does it: a 2x2 average pool.

    Stride 2 pads one zero row/column at the end and averages over all 4 cells (only odd maps
    ever reach the pad); stride 1 is a TF 'SAME' pool, averaging the valid cells only.
    """
    if strides > 1:
        return nn.avg_pool(x, (2, 2), (strides, strides), padding=((0, 1), (0, 1)))
    return nn.avg_pool(x, (2, 2), (1, 1), padding="SAME", count_include_pad=False)


class SKConv(nn.Module):
    """SimCLR v2's selective-kernel 3x3 conv (https://arxiv.org/abs/1903.06586).

    One 3x3 conv makes two streams of `filters` channels (its first and second half of outputs),
    each BN + ReLU'd; their sum is globally pooled into a 1x1 conv -> BN -> ReLU -> 1x1 conv MLP
    whose two halves, softmaxed over the streams, weigh them. Both streams are 3x3 as in the
    official code (not the SK paper's dilated second kernel), so released weights load as they are.
    """

    filters: int
    strides: int
    sk_ratio: float
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        f = self.filters
        y = self.conv(2 * f, (3, 3), (self.strides, self.strides), name="conv")(x)
        y = nn.relu(self.norm(name="bn")(y))
        streams = jnp.stack([y[..., :f], y[..., f:]])  # [2, B, H, W, f]
        g = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
        mid = max(int(f * self.sk_ratio), SK_MIN_DIM)
        g = self.conv(mid, (1, 1), name="fc1")(g)
        g = nn.relu(self.norm(name="fc1_bn")(g))
        mix = self.conv(2 * f, (1, 1), name="fc2")(g)
        mix = jax.nn.softmax(jnp.stack([mix[..., :f], mix[..., f:]]), axis=0)
        return jnp.sum(streams * mix, axis=0)


def _shortcut(x, features, strides, sk_ratio, conv, norm) -> jnp.ndarray:
    """Projection shortcut: strided 1x1 conv, or (ResNet-D, with SK) avg-pool then 1x1 conv."""
    if sk_ratio > 0:
        x = _avg_pool_d(x, strides)
        strides = 1
    x = conv(features, (1, 1), (strides, strides), name="downsample_conv")(x)
    return norm(name="downsample_bn")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or projection shortcut.

    `sk_ratio > 0` switches on only the ResNet-D shortcut: the official SimCLR v2 code has no SK
    conv in basic blocks.
    """

    filters: int
    strides: int
    conv: Any
    norm: Any
    zero_init_last_bn: bool = False
    sk_ratio: float = 0.0
    project: bool = False  # a projection shortcut even when the shape does not change

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=last_init, name="bn2")(y)
        if self.project or residual.shape != y.shape:
            residual = _shortcut(
                residual, self.filters, self.strides, self.sk_ratio, self.conv, self.norm
            )
        return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4) bottleneck with a projection shortcut.

    With `sk_ratio > 0` the 3x3 is an `SKConv` and the shortcut is ResNet-D's (SimCLR v2).
    """

    filters: int
    strides: int
    conv: Any
    norm: Any
    zero_init_last_bn: bool = False
    sk_ratio: float = 0.0
    project: bool = False  # a projection shortcut even when the shape does not change

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        residual = x
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        if self.sk_ratio > 0:
            y = SKConv(
                self.filters, self.strides, self.sk_ratio, self.conv, self.norm, name="sk_conv2"
            )(y)
        else:
            y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv2")(y)
            y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=last_init, name="bn3")(y)
        if self.project or residual.shape != y.shape:
            residual = _shortcut(
                residual, self.filters * 4, self.strides, self.sk_ratio, self.conv, self.norm
            )
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet v1.5 encoder returning globally average-pooled features `[B, C]`.

    `sk_ratio > 0` gives SimCLR v2's SK-ResNet: SK 3x3 convs in bottlenecks and the ResNet-D
    three-conv stem (3x3/2 at half width, 3x3, 3x3) and avg-pool projection shortcuts.

    BatchNorm normalises over the batch axis of its input. Under `jax.jit` on a batch sharded
    over a mesh that batch is the global one, so the statistics are global (SimCLR's global
    BN), with no axis names to thread through the model.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    width_multiplier: int = 1
    base_width: int = 64
    stem: str = "imagenet"
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    sk_ratio: float = 0.0
    compat: str = "torchvision"
    norm_kind: str = "batch"  # one of NORMS (config.model.norm)
    # The convolution primitive for every conv (None: `lax.conv_general_dilated`). The runtime
    # picks a backend's faster formulation of the same sums (`runtime.cpu_conv` on CPU).
    conv_general_dilated: Callable[..., jnp.ndarray] | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True, with_local: bool = False) -> Any:
        """Pooled features `[B, C]`; with `with_local`, also the local features `[B, h*w, C']`.

        The local features (Deep InfoMax's) are the map the second-to-last stage outputs: 4x4 on
        16 px digits, 8x8 on CIFAR (the paper's local map), 14x14 on 224 px images.
        """
        conv = functools.partial(
            _conv, dtype=self.dtype, conv_general_dilated=self.conv_general_dilated
        )
        if self.norm_kind == "layer":
            norm = functools.partial(
                nn.LayerNorm, epsilon=BN_EPSILON, reduction_axes=(-3, -2, -1), dtype=self.dtype
            )
        else:
            norm = functools.partial(
                nn.BatchNorm,
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                dtype=self.dtype,
            )
        width = self.base_width * self.width_multiplier
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            if self.sk_ratio > 0:  # ResNet-D stem
                x = conv(width // 2, (3, 3), (2, 2), name="stem_conv1")(x)
                x = nn.relu(norm(name="stem_bn1")(x))
                x = conv(width // 2, (3, 3), name="stem_conv2")(x)
                x = nn.relu(norm(name="stem_bn2")(x))
                x = conv(width, (3, 3), name="stem_conv")(x)
            else:
                x = conv(width, (7, 7), (2, 2), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            pool_pad = "SAME" if self.compat == "simclr_tf" else [(1, 1), (1, 1)]
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pool_pad)
        elif self.stem == "cifar":
            x = conv(width, (3, 3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        else:
            raise ValueError(f"stem={self.stem!r} is not one of {STEMS}")
        block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
        local = x
        for i, num_blocks in enumerate(self.stage_sizes):
            if i == len(self.stage_sizes) - 1:
                local = x
            for j in range(num_blocks):
                x = block_cls(
                    filters=width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_last_bn=self.zero_init_last_bn,
                    sk_ratio=self.sk_ratio,
                    project=self.compat == "simclr_tf" and j == 0,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not with_local:
            return pooled
        return pooled, local.reshape(local.shape[0], -1, local.shape[-1]).astype(jnp.float32)


def resnet(
    depth: int,
    width_multiplier: int = 1,
    stem: str = "imagenet",
    base_width: int = 64,
    **kwargs: Any,
) -> ResNet:
    """Builds a ResNet-`depth` encoder; raises ValueError naming allowed values on bad input."""
    if depth not in RESNET_LAYOUTS:
        allowed = sorted(RESNET_LAYOUTS)
        raise ValueError(f"ResNet depth={depth!r} is not supported; allowed: {allowed}")
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is not supported; allowed: {list(STEMS)}")
    if not isinstance(width_multiplier, int) or width_multiplier < 1:
        raise ValueError(f"width_multiplier={width_multiplier!r} must be a positive int (1, 2, 3)")
    sk_ratio = kwargs.get("sk_ratio", 0.0)
    if not isinstance(sk_ratio, (int, float)) or not 0 <= sk_ratio <= 1:
        raise ValueError(f"sk_ratio={sk_ratio!r} must be in [0, 1] (0: plain, 0.0625: SimCLR v2)")
    if kwargs.get("norm_kind", "batch") not in NORMS:
        raise ValueError(f"norm={kwargs['norm_kind']!r} is not supported; allowed: {list(NORMS)}")
    compat = kwargs.get("compat", "torchvision")
    if compat not in COMPATS:
        raise ValueError(f"compat={compat!r} is not supported; allowed: {list(COMPATS)}")
    if not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width={base_width!r} must be a positive int (64 is standard)")
    block, stages = RESNET_LAYOUTS[depth]
    return ResNet(
        stage_sizes=stages,
        block=block,
        width_multiplier=width_multiplier,
        base_width=base_width,
        stem=stem,
        **kwargs,
    )


def feature_dim(depth: int, width_multiplier: int = 1, base_width: int = 64) -> int:
    """Channels of the pooled features of a ResNet-`depth` encoder."""
    block, stages = RESNET_LAYOUTS[depth]
    expansion = 4 if block == "bottleneck" else 1
    return base_width * width_multiplier * 2 ** (len(stages) - 1) * expansion
