"""SimCLR's colour ops as pure JAX functions on one image (the deterministic part of the jitter).

Each op maps a float32 `[H, W, 3]` image in [0, 1] (or any `[..., 3]`) to one clipped to [0, 1];
`color_jitter_params` draws one image's factors and order. The random application
(`color_jitter`, `random_grayscale`) is in `augment`, which re-exports every name here.
"""

import jax
import jax.numpy as jnp

# ITU-R 601 luma, as in tf.image.rgb_to_grayscale and torchvision.
_LUMA = (0.2989, 0.5870, 0.1140)


def _clip(image: jax.Array) -> jax.Array:
    """Clips to the valid [0, 1] range."""
    return jnp.clip(image, 0.0, 1.0)


def _luma(image: jax.Array) -> jax.Array:
    """Grayscale value `[..., 1]` of an RGB image `[..., 3]`."""
    # A weighted sum of channel slices, not a reduction over the size-3 minor axis: XLA:CPU runs
    # the reduction ~10x slower (measured under vmap at 224 px).
    r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _mean_luma(image: jax.Array) -> jax.Array:
    """Mean grayscale value (a scalar) of an RGB image `[H, W, 3]`."""
    # Luma of the channel means: reducing over the spatial axes keeps XLA:CPU's fast layout.
    means = jnp.mean(image, axis=tuple(range(image.ndim - 1)))
    return _LUMA[0] * means[0] + _LUMA[1] * means[1] + _LUMA[2] * means[2]


def to_grayscale(image: jax.Array) -> jax.Array:
    """Luma (0.2989 R + 0.5870 G + 0.1140 B), returned with 3 equal channels."""
    return _clip(jnp.broadcast_to(_luma(image), image.shape))


def adjust_brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Multiplies the image by `factor` (SimCLRv2's multiplicative brightness)."""
    return _clip(image * factor)


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends the image with its mean grayscale value (torchvision's contrast).

    `factor` 0 gives a uniform gray image, 1 the image itself. tf.image.adjust_contrast (used by
    SimCLR's TF code) blends each channel with its own mean instead; the two agree on gray images.
    """
    mean = _mean_luma(image)
    return _clip(mean + factor * (image - mean))


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends the image with its per-pixel grayscale (factor 0: gray, 1: unchanged)."""
    gray = _luma(image)
    return _clip(gray + factor * (image - gray))


def _fraction(x: jax.Array) -> jax.Array:
    """x mod 1 (in [0, 1) for negative x too), as x - floor(x)."""
    # jnp.remainder lowers to fmod plus sign fixes, which XLA:CPU does not vectorise (~7x slower).
    return x - jnp.floor(x)


def _hsv_channels(r: jax.Array, g: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
    """(hue, saturation, value) planes of RGB planes in [0, 1]; hue in [0, 1) turns."""
    value = jnp.maximum(jnp.maximum(r, g), b)
    chroma = value - jnp.minimum(jnp.minimum(r, g), b)
    # Safe denominators keep gray (chroma 0) and black (value 0) pixels free of NaNs; their hue
    # and saturation are defined as 0, like TF and colorsys.
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    safe_value = jnp.where(value > 0, value, 1.0)
    saturation = jnp.where(value > 0, chroma / safe_value, 0.0)
    hue_r = (g - b) / safe_chroma
    hue_g = 2.0 + (b - r) / safe_chroma
    hue_b = 4.0 + (r - g) / safe_chroma
    hue = jnp.where(value == r, hue_r, jnp.where(value == g, hue_g, hue_b))
    hue = jnp.where(chroma > 0, hue / 6.0, 0.0)
    hue = jnp.where(hue < 0, hue + 1.0, hue)
    return hue, saturation, value


def _rgb_channels(hue: jax.Array, saturation: jax.Array, value: jax.Array) -> tuple[jax.Array, ...]:
    """(r, g, b) planes of HSV planes (hue in turns, any real)."""
    h6 = _fraction(hue) * 6.0

    # Branch-free form of the six-sector formula (channel n is v where k = (n + 6h) mod 6 is in
    # [4, 6) and v(1 - s) where k is in [1, 3]); it avoids selecting on the sector index.
    def channel(n: float) -> jax.Array:
        k = n + h6  # in [1, 11]: one subtraction is (n + 6h) mod 6
        k = jnp.where(k >= 6.0, k - 6.0, k)
        return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return channel(5.0), channel(3.0), channel(1.0)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """Converts RGB `[..., 3]` in [0, 1] to HSV `[..., 3]`, hue in [0, 1) turns (as TF's kernel)."""
    return jnp.stack(_hsv_channels(rgb[..., 0], rgb[..., 1], rgb[..., 2]), axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Converts HSV `[..., 3]` (hue in turns) back to RGB `[..., 3]`."""
    return jnp.stack(_rgb_channels(hsv[..., 0], hsv[..., 1], hsv[..., 2]), axis=-1)


def adjust_hue(image: jax.Array, delta: jax.Array | float) -> jax.Array:
    """Rotates the hue by `delta` turns of the hue circle (delta in [-0.5, 0.5])."""
    # Planes all the way: stacking HSV into [..., 3] and slicing it apart again costs XLA:CPU
    # more than the conversion itself.
    hue, saturation, value = _hsv_channels(image[..., 0], image[..., 1], image[..., 2])
    return _clip(jnp.stack(_rgb_channels(_fraction(hue + delta), saturation, value), axis=-1))


def color_jitter_params(
    key: jax.Array, strength: jax.Array | float, random_order: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Samples SimCLR jitter `(brightness, contrast, saturation, hue, order)` for one image.

    Brightness, contrast and saturation factors are uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s],
    the hue delta uniform in [-0.2 s, 0.2 s]; `order` is an int32 `[4]` permutation of the op
    indices (0 brightness, 1 contrast, 2 saturation, 3 hue), the identity if not `random_order`.
    """
    k_bright, k_contrast, k_sat, k_hue, k_order = jax.random.split(key, 5)
    lo = jnp.maximum(0.0, 1.0 - 0.8 * strength)
    hi = 1.0 + 0.8 * strength
    brightness = jax.random.uniform(k_bright, minval=lo, maxval=hi)
    contrast = jax.random.uniform(k_contrast, minval=lo, maxval=hi)
    saturation = jax.random.uniform(k_sat, minval=lo, maxval=hi)
    hue = jax.random.uniform(k_hue, minval=-0.2 * strength, maxval=0.2 * strength)
    if random_order:
        order = jax.random.permutation(k_order, 4).astype(jnp.int32)
    else:
        order = jnp.arange(4, dtype=jnp.int32)
    return brightness, contrast, saturation, hue, order


def _mix(image: jax.Array, coefficients: jax.Array) -> jax.Array:
    """clip(a x + b luma(x) + c mean(luma(x))) for coefficients (a, b, c): one linear colour op."""
    luma = _luma(image)
    a, b, c = coefficients[0], coefficients[1], coefficients[2]
    return _clip(a * image + b * luma + c * _mean_luma(image))


def apply_color_ops(
    image: jax.Array,
    brightness: jax.Array | float,
    contrast: jax.Array | float,
    saturation: jax.Array | float,
    hue: jax.Array | float,
    order: jax.Array,
) -> jax.Array:
    """Applies the four colour ops in `order` (op indices as in `color_jitter_params`)."""
    # Brightness, contrast and saturation are each a linear mix (a, b, c) of the pixel, its luma
    # and the mean luma; only the hue needs an RGB<->HSV round trip. So the ops before the hue
    # are three mix slots, the hue runs once, then three more slots, unused slots getting the
    # identity mix. Under vmap (where `order` differs per image) this computes 6 cheap mixes and
    # one hue; a `lax.switch` per slot would compute all four ops, hue included, in every slot.
    one, zero = jnp.ones(()), jnp.zeros(())
    table = jnp.stack(
        [
            jnp.stack([jnp.asarray(brightness, jnp.float32), zero, zero]),
            jnp.stack([jnp.asarray(contrast, jnp.float32), zero, 1.0 - contrast]),
            jnp.stack([jnp.asarray(saturation, jnp.float32), 1.0 - saturation, zero]),
            jnp.stack([one, zero, zero]),  # the hue's slot: no mix
        ]
    ).astype(image.dtype)
    order = jnp.asarray(order)
    hue_slot = jnp.argmax(order == 3)
    coefficients = table[order]  # [4 slots, 3]
    identity = table[3]
    # Slot s runs before the hue if s < hue_slot, after it if s > hue_slot.
    for s in range(3):
        image = _mix(image, jnp.where(s < hue_slot, coefficients[s], identity))
    image = adjust_hue(image, hue)
    for s in range(1, 4):
        image = _mix(image, jnp.where(s > hue_slot, coefficients[s], identity))
    return image
