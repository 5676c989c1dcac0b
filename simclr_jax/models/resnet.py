"""ResNet v1.5 encoders (stride on the 3x3 conv) with ImageNet or CIFAR stems."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
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


def _conv(
    features: int,
    kernel_size: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    *,
    name: str,
    dtype: Any = jnp.float32,
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
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or projection shortcut."""

    filters: int
    strides: int
    conv: Any
    norm: Any
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=last_init, name="bn2")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters, (1, 1), (self.strides, self.strides), name="downsample_conv"
            )(residual)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4) bottleneck with a projection shortcut."""

    filters: int
    strides: int
    conv: Any
    norm: Any
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        residual = x
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=last_init, name="bn3")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters * 4, (1, 1), (self.strides, self.strides), name="downsample_conv"
            )(residual)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet v1.5 encoder returning globally average-pooled features `[B, C]`.

    BatchNorm normalises over the batch axis of its input. Under `jax.jit` on a batch sharded
    over a mesh that batch is the global one, so the statistics are global (SimCLR's global
    BN); inside `shard_map`/`pmap` pass `bn_axis_name` to reduce across devices explicitly.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    width_multiplier: int = 1
    base_width: int = 64
    stem: str = "imagenet"
    zero_init_last_bn: bool = False
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        conv = functools.partial(_conv, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            axis_name=self.bn_axis_name,
        )
        width = self.base_width * self.width_multiplier
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(width, (7, 7), (2, 2), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        elif self.stem == "cifar":
            x = conv(width, (3, 3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        else:
            raise ValueError(f"stem={self.stem!r} is not one of {STEMS}")
        block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = block_cls(
                    filters=width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_last_bn=self.zero_init_last_bn,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


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
        raise ValueError(f"width_multiplier={width_multiplier!r} must be a positive int (1, 2, 4)")
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
