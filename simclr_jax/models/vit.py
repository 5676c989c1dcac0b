"""Vision Transformer encoders (Dosovitskiy et al. 2020) in big_vision's naming.

Pre-norm blocks `Transformer/encoderblock_{i}` (LayerNorm, multi-head self-attention, LayerNorm,
GELU MLP), a final `Transformer/encoder_norm`, a patch embedding `embedding` (kernel
`[p, p, 3, D]` + bias), a class token `cls` and a position embedding that covers the class token
and the patches, as torchvision's, timm's and MoCo v3's do (big_vision adds it to the patches
only): with it ViT-B/16 has torchvision's 85,798,656 encoder parameters and exports one to one.
The MLP's GELU is the exact (erf) one, as in torchvision, timm and MoCo v3.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# size -> (width, depth, mlp_dim, heads): Table 2 of arXiv 2106.04560 (big_vision's table), plus
# 'mu', a test-sized one (1 block of width 16, torchvision's smallest sensible twin).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (16, 1, 32, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
POSEMBS = ("learn", "sincos2d")  # learned, or MoCo v3's fixed 2-D sin-cos (not a parameter)
POOLS = ("tok", "gap")  # the class token's output, or the mean of the patch tokens
LN_EPSILON = 1e-6  # torchvision's and timm's LayerNorm eps (flax's default too)
_VARIANT = re.compile(r"^([A-Za-z]+)/([1-9][0-9]*)$")


def parse_variant(variant: str) -> tuple[tuple[int, int, int, int], int]:
    """`'B/16'` -> ((width, depth, mlp_dim, heads), patch); ValueError naming what is allowed."""
    m = _VARIANT.match(str(variant))
    if m is None or m.group(1) not in VIT_SIZES:
        raise ValueError(
            f"model.variant={variant!r} is not '<size>/<patch>' with size one of "
            f"{list(VIT_SIZES)} and a positive patch (e.g. 'B/16', 'S/4')"
        )
    return VIT_SIZES[m.group(1)], int(m.group(2))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """MoCo v3's fixed 2-D sin-cos embedding `[h * w, width]`: sin/cos of x, then of y.

    Row-major over the grid; each quarter of the channels holds one of sin(x), cos(x), sin(y),
    cos(y) at the frequencies `temperature ** -(i / (width/4 - 1))`.
    """
    if width % 4:
        raise ValueError(f"a sin-cos position embedding needs a width divisible by 4, not {width}")
    y, x = np.mgrid[:h, :w].astype(np.float32)
    omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float32) / (width // 4 - 1))
    ox, oy = np.outer(x.ravel(), omega), np.outer(y.ravel(), omega)
    return np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], axis=1)


def resample_posemb(posemb: jax.Array, num_extra: int, h: int, w: int) -> jax.Array:
    """A `[1, extra + g*g, D]` learned embedding for an `h x w` patch grid (bilinear resize).

    The class token's entries (`num_extra`) are kept; the square grid of the patch entries is
    resized with half-pixel centres (torch's `interpolate(align_corners=False)`), as big_vision
    does when it fine-tunes at a higher resolution.
    """
    n, d = posemb.shape[1] - num_extra, posemb.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"the position embedding's {n} patch entries are not a square grid")
    if (g, g) == (h, w):
        return posemb
    grid = posemb[0, num_extra:].reshape(g, g, d).astype(jnp.float32)
    grid = jax.image.resize(grid, (h, w, d), "bilinear", antialias=False)
    return jnp.concatenate([posemb[:, :num_extra], grid.reshape(1, h * w, d)], axis=1)


def _attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: Any = None) -> jax.Array:
    """Softmax attention as one `jax.nn.dot_product_attention` (a fused kernel on GPU/TPU)."""
    return jax.nn.dot_product_attention(query, key, value, mask=mask)


class PatchEmbed(nn.Module):
    """A stride-`patch` `patch x patch` convolution to `width` channels, as patches @ kernel.

    The kernel is stored as the convolution's `[p, p, 3, D]`; it is applied as a reshape and
    one matmul (the same sums: XLA:CPU runs the matmul many times faster than the conv).
    """

    width: int
    patch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, (n, hh, ww, c) = self.patch, x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        h, w = hh // p, ww // p
        patches = x[:, : h * p, : w * p].reshape(n, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        y = jnp.einsum("nhwijc,ijcd->nhwd", patches.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU (exact) -> Dense, xavier-uniform kernels (big_vision's init)."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inits = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
        )
        y = nn.gelu(nn.Dense(self.mlp_dim, **inits)(x), approximate=False)
        return nn.Dense(x.shape[-1], **inits)(y)


class Encoder1DBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x)); the residual stream stays fp32."""

    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask`: bool, broadcastable to `[N, heads, queries, keys]`; False keys are never
        attended (the text encoder's pads). None: every token attends to every token."""
        y = nn.LayerNorm(epsilon=LN_EPSILON)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            attention_fn=_attention,
        )(y, y, mask=mask)
        x = x + y.astype(x.dtype)
        y = nn.LayerNorm(epsilon=LN_EPSILON)(x)
        return x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y).astype(x.dtype)


class Encoder(nn.Module):
    """`depth` blocks `encoderblock_{i}` and the final `encoder_norm`."""

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask`: the attention mask of every block (`Encoder1DBlock`); None: no mask."""
        for i in range(self.depth):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dtype, name=f"encoderblock_{i}")(
                x, mask
            )
        return nn.LayerNorm(epsilon=LN_EPSILON, name="encoder_norm")(x)


class ViT(nn.Module):
    """A ViT encoder: images `[N, H, W, 3]` in [0, 1] -> pooled features `[N, width]` (fp32).

    `posemb_grid`: side of the learned position-embedding grid in patches (0: the input's at
    init). An input with another grid is given the stored grid resized (`resample_posemb`), so a
    pretrained encoder evaluates or fine-tunes at another resolution. `train` is accepted for the
    ResNet's signature; nothing here depends on it (no dropout, no BatchNorm).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch: int
    posemb: str = "learn"
    pool: str = "tok"
    posemb_grid: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True, with_local: bool = False) -> Any:
        """Pooled features `[N, D]`; with `with_local`, also the patch tokens `[N, h*w, D]`
        (the local features of Deep InfoMax, as a ResNet's last-but-one stage map)."""
        del train
        x = PatchEmbed(self.width, self.patch, self.dtype, name="embedding")(x)
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d).astype(jnp.float32)
        extra = 1 if self.pool == "tok" else 0
        if extra:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = x + self._posemb(h, w, d, extra)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, name="Transformer")(x)
        pooled = (x[:, 0] if extra else jnp.mean(x, axis=1)).astype(jnp.float32)
        return (pooled, x[:, extra:].astype(jnp.float32)) if with_local else pooled

    def _posemb(self, h: int, w: int, d: int, extra: int) -> jax.Array:
        """`[1, extra + h*w, d]`: sin-cos (zeros for the class token) or the learned one."""
        if self.posemb == "sincos2d":
            pe = posemb_sincos_2d(h, w, d)
            return jnp.asarray(np.concatenate([np.zeros((extra, d), np.float32), pe])[None])
        if self.has_variable("params", "pos_embedding"):
            # Applying: the stored grid is the pretraining one, whatever this input's grid is.
            pe = self.get_variable("params", "pos_embedding")
        else:
            g = self.posemb_grid or h  # images are square: the grid is g x g
            shape = (1, extra + g * g, d)
            pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape)
        return resample_posemb(pe, extra, h, w)


def build_vit(
    variant: str,
    posemb: str = "learn",
    pool: str = "tok",
    posemb_grid: int = 0,
    dtype: Any = jnp.float32,
) -> ViT:
    """Builds the ViT `variant` ('B/16'); ValueError naming the allowed values on bad input."""
    (width, depth, mlp_dim, heads), patch = parse_variant(variant)
    if posemb not in POSEMBS:
        raise ValueError(f"model.posemb={posemb!r} is not one of {list(POSEMBS)}")
    if pool not in POOLS:
        raise ValueError(f"model.pool={pool!r} is not one of {list(POOLS)}")
    if posemb == "sincos2d" and width % 4:
        raise ValueError(
            f"model.posemb='sincos2d' needs a width divisible by 4; {variant} has {width}"
        )
    return ViT(width, depth, mlp_dim, heads, patch, posemb, pool, int(posemb_grid), dtype)


def vit_feature_dim(variant: str) -> int:
    """Width of the pooled features of the ViT `variant`."""
    return parse_variant(variant)[0][0]
