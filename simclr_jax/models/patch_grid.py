"""CPC's networks: an encoder applied to a grid of overlapping patches, and the masked context net.

`PatchGridEncoder` cuts an image into a `G x G` grid of `patch`-pixel patches at `stride`
(CPC v2: 7 x 7 patches of 64 px at stride 32 of a 256 px crop), encodes every patch with the
wrapped encoder, and returns the mean of the patch features: the representation CPC evaluates.
`ContextNetwork` summarises the grid with convolutions masked so that position (i, j) sees only
rows <= i (PixelCNN's causal mask, by rows), so a prediction of row i + k never sees its target.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def grid_size(image_size: int, patch: int, stride: int) -> int:
    """Patches per side of the grid; a ValueError naming the sizes when none fits."""
    if patch <= 0 or stride <= 0 or patch > image_size:
        raise ValueError(
            f"patch grid of {patch} px patches at stride {stride} does not fit {image_size} px "
            "images: need 0 < patch <= image size and stride > 0"
        )
    return (image_size - patch) // stride + 1


def extract_patches(x: jax.Array, patch: int, stride: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, G, G, patch, patch, C]`, patch (i, j) at (i * stride, j * stride)."""
    g = grid_size(x.shape[1], patch, stride)
    starts = np.arange(g) * stride
    rows = (starts[:, None] + np.arange(patch)[None, :]).reshape(-1)  # [G * patch]
    x = jnp.take(x, rows, axis=1).reshape((x.shape[0], g, patch) + x.shape[2:])
    x = jnp.take(x, rows, axis=3).reshape(x.shape[:3] + (g, patch, x.shape[-1]))
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5))


class PatchGridEncoder(nn.Module):
    """The wrapped encoder on every patch of a grid; mean-pooled patch features `[B, D]`.

    Input: images `[B, H, W, C]`, or patches already cut (and augmented one by one, as CPC
    trains) `[B, G, G, p, p, C]`. `with_grid=True` also returns the features `[B, G, G, D]`.
    """

    encoder: Any
    patch: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True, with_grid: bool = False) -> Any:
        if x.ndim == 4:
            x = extract_patches(x, self.patch, self.stride)
        b, g = x.shape[0], x.shape[1]
        features = self.encoder(x.reshape((b * g * g,) + x.shape[3:]), train=train)
        grid = features.reshape(b, g, g, -1)
        pooled = jnp.mean(grid, axis=(1, 2))
        return (pooled, grid) if with_grid else pooled


class MaskedConv(nn.Module):
    """A 3x3 convolution that sees the row above and its own row, never the rows below."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mask = np.ones((3, 3, 1, 1), np.float32)
        mask[2] = 0.0  # the row below
        y = jax.lax.conv_general_dilated(
            x, kernel * mask, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias


class ContextNetwork(nn.Module):
    """1x1 in, `layers` residual blocks (ReLU, masked 3x3, ReLU, 1x1): c[i, j] sees rows <= i."""

    width: int
    layers: int = 2

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = nn.Dense(self.width, name="embed")(z.astype(jnp.float32))
        for i in range(self.layers):
            y = MaskedConv(self.width, name=f"masked{i + 1}")(nn.relu(x))
            x = x + nn.Dense(self.width, name=f"mix{i + 1}")(nn.relu(y))
        return x


def direction_targets(g: int, direction: int, k: int) -> np.ndarray:
    """Flat grid indices of the targets of the predictions k rows ahead, in direction `direction`.

    Direction d reads the grid rotated by d quarter turns (0: top-down, then the three others,
    as CPC v2 predicts in all four); the prediction from rotated row i, column j targets rotated
    row i + k, column j. Returns `[(G - k) * G]` indices into the unrotated `G * G` grid, in the
    order of the rotated rows 0..G-k-1 (row-major), which is the predictions' order.
    """
    idx = np.rot90(np.arange(g * g).reshape(g, g), direction)
    return idx[k:, :].reshape(-1)
