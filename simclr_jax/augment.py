"""SimCLR augmentations as pure JAX functions on one image.

Every random op is `f(key, image, ...) -> image` on a float32 `[H, W, C]` image (C=3) with values
in [0, 1], and returns an image clipped to [0, 1]. Ops are jit- and vmap-able: shapes are static
(sizes are Python ints), randomness comes only from the key, and random application is a
`jnp.where` on a uniform draw (under `vmap` a `lax.cond` becomes a select anyway; a static p of
0 or 1 skips the draw). Batches are made by the caller with `jax.vmap` over split keys; `views`
does this for SimCLR's two views.

One SimCLR view (Chen et al. 2020, appendix A; `simclr_view`) is: random resized crop -> flip ->
colour jitter (p 0.8, random order) -> colour drop (p 0.2) -> Gaussian blur -> solarize.
"""

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax.augment_color import (  # noqa: F401  (augment's public colour ops)
    _clip,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_color_ops,
    color_jitter_params,
    hsv_to_rgb,
    rgb_to_hsv,
    to_grayscale,
)


def _maybe_apply(
    key: jax.Array, p: float | jax.Array, op: Callable[[jax.Array], jax.Array], image: jax.Array
) -> jax.Array:
    """Returns `op(image)` with probability p, else `image`."""
    # A static p of 0 or 1 skips the draw and the unused branch, so ops switched off in the
    # config (e.g. blur on CIFAR) cost nothing, not even compile time.
    if isinstance(p, int | float):
        if p <= 0:
            return image
        if p >= 1:
            return op(image)
    # `<` with p=0 never fires and with p=1 always fires, since uniform draws lie in [0, 1).
    return jnp.where(jax.random.uniform(key) < p, op(image), image)


# --------------------------------------------------------------------------------------------
# Random resized crop
# --------------------------------------------------------------------------------------------


def crop_params(
    key: jax.Array,
    height: int,
    width: int,
    area_range: Sequence[float] = (0.08, 1.0),
    aspect_range: Sequence[float] = (3 / 4, 4 / 3),
    max_attempts: int = 10,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Samples a random-resized-crop window; returns int32 scalars `(y0, x0, h, w)`.

    The area fraction is uniform in `area_range` and the log aspect ratio (w / h) uniform in
    log(`aspect_range`), as in torchvision's RandomResizedCrop. All `max_attempts` candidates are
    drawn at once and the first one that fits is taken; if none fits the whole image is used (as
    TF's `sample_distorted_bounding_box`). The offset is uniform among the valid positions.
    """
    k_area, k_aspect, k_y, k_x = jax.random.split(key, 4)
    total = float(height * width)
    area = total * jax.random.uniform(
        k_area, (max_attempts,), minval=area_range[0], maxval=area_range[1]
    )
    log_aspect = jax.random.uniform(
        k_aspect,
        (max_attempts,),
        minval=math.log(aspect_range[0]),
        maxval=math.log(aspect_range[1]),
    )
    aspect = jnp.exp(log_aspect)
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h >= 1) & (w >= 1) & (h <= height) & (w <= width)
    first = jnp.argmax(fits)  # index of the first True (0 when none; then `any` picks the fallback)
    found = jnp.any(fits)
    h = jnp.where(found, h[first], height).astype(jnp.int32)
    w = jnp.where(found, w[first], width).astype(jnp.int32)
    # floor(u * n) with u in [0, 1) is uniform on {0, ..., n-1}; the min guards float rounding.
    y0 = jnp.minimum(jnp.floor(jax.random.uniform(k_y) * (height - h + 1)), height - h)
    x0 = jnp.minimum(jnp.floor(jax.random.uniform(k_x) * (width - w + 1)), width - w)
    return y0.astype(jnp.int32), x0.astype(jnp.int32), h, w


def resize_crop(
    image: jax.Array, y0: jax.Array, x0: jax.Array, h: jax.Array, w: jax.Array, size: int
) -> jax.Array:
    """Resamples the window `[y0:y0+h, x0:x0+w]` of an `[H, W, C]` image to `[size, size, C]`.

    Bilinear, antialiased when downscaling (`jax.image.scale_and_translate`). The window may be
    traced; the whole-image window of a square `size`-sided image is the identity (scale 1,
    translation 0).
    """
    channels = image.shape[-1]
    scale = jnp.stack([size / jnp.asarray(h, jnp.float32), size / jnp.asarray(w, jnp.float32)])
    # scale_and_translate maps input coordinate c to c * scale + translation, so the window's
    # corner lands on the output's origin.
    translation = -jnp.stack([jnp.asarray(y0, jnp.float32), jnp.asarray(x0, jnp.float32)]) * scale
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32),
        (size, size, channels),
        (0, 1),
        scale,
        translation,
        method="linear",
        antialias=True,
    )
    return _clip(out)


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    size: int,
    area_range: Sequence[float] = (0.08, 1.0),
    aspect_range: Sequence[float] = (3 / 4, 4 / 3),
    max_attempts: int = 10,
) -> jax.Array:
    """Random crop of random area and aspect ratio, resized to `[size, size, C]`."""
    height, width = image.shape[0], image.shape[1]
    y0, x0, h, w = crop_params(key, height, width, area_range, aspect_range, max_attempts)
    return resize_crop(image, y0, x0, h, w, size)


def random_flip(key: jax.Array, image: jax.Array, p: float = 0.5) -> jax.Array:
    """Flips the image left-right with probability p."""
    return _maybe_apply(key, p, lambda x: x[:, ::-1, :], image)


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


def color_jitter(
    key: jax.Array,
    image: jax.Array,
    strength: jax.Array | float,
    p: float = 0.8,
    random_order: bool = True,
) -> jax.Array:
    """SimCLR colour jitter of the given strength, applied with probability p."""
    k_apply, k_params = jax.random.split(key)
    params = color_jitter_params(k_params, strength, random_order)
    return _maybe_apply(k_apply, p, lambda x: apply_color_ops(x, *params), image)


def random_grayscale(key: jax.Array, image: jax.Array, p: float = 0.2) -> jax.Array:
    """Converts to grayscale (3 equal channels) with probability p (SimCLR's colour drop)."""
    return _maybe_apply(key, p, to_grayscale, image)


# --------------------------------------------------------------------------------------------
# Blur and solarize
# --------------------------------------------------------------------------------------------


def blur_kernel_size(side: int) -> int:
    """Odd blur kernel size of about 10% of `side`, at least 3 (SimCLR: 2 * (side//10 // 2) + 1)."""
    return 2 * max(1, (side // 10) // 2) + 1


def gaussian_blur(image: jax.Array, sigma: jax.Array | float, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur of an `[H, W, C]` image with reflect padding.

    `kernel_size` is a static odd int; `sigma` (pixels) may be traced. The kernel is normalised to
    sum 1 and the padding copies image values, so a constant image stays constant.
    """
    radius = kernel_size // 2
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    # A floor on sigma keeps sigma=0 finite; the kernel is then a delta (the identity).
    sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)
    kernel = jnp.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = kernel / jnp.sum(kernel)
    height, width = image.shape[0], image.shape[1]
    # Reflect padding needs the pad smaller than the side; edge padding works for any size.
    mode = "reflect" if radius < min(height, width) else "edge"
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode=mode)
    # A sum of shifted slices: vmaps into plain elementwise work, no per-image conv kernel.
    rows = sum(kernel[i] * padded[i : i + height] for i in range(kernel_size))
    out = sum(kernel[i] * rows[:, i : i + width] for i in range(kernel_size))
    return _clip(out)


def random_gaussian_blur(
    key: jax.Array,
    image: jax.Array,
    p: float = 0.5,
    sigma_range: Sequence[float] = (0.1, 2.0),
) -> jax.Array:
    """Blurs with probability p, sigma uniform in `sigma_range`, kernel ~10% of the image side."""
    k_apply, k_sigma = jax.random.split(key)
    sigma = jax.random.uniform(k_sigma, minval=sigma_range[0], maxval=sigma_range[1])
    kernel_size = blur_kernel_size(min(image.shape[0], image.shape[1]))
    return _maybe_apply(k_apply, p, lambda x: gaussian_blur(x, sigma, kernel_size), image)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Inverts pixels at or above `threshold`: x if x < threshold else 1 - x."""
    return _clip(jnp.where(image < threshold, image, 1.0 - image))


def random_solarize(
    key: jax.Array, image: jax.Array, p: float = 0.0, threshold: float = 0.5
) -> jax.Array:
    """Solarizes with probability p (0 by default: SimCLR does not solarize, BYOL does)."""
    return _maybe_apply(key, p, lambda x: solarize(x, threshold), image)


# --------------------------------------------------------------------------------------------
# Config and SimCLR views
# --------------------------------------------------------------------------------------------


def default_augment_config(image_size: int) -> ml_collections.ConfigDict:
    """SimCLR's ImageNet augmentation settings for crops of side `image_size`.

    The one source of the augment keys and their defaults: the run config's `config.augment`
    is this section, and `AUGMENT_KEYS` lists its fields.
    """
    config = ml_collections.ConfigDict()
    config.crop = True  # random resized crop on device (False when the host crops: resize only)
    config.image_size = image_size  # crop output side: the encoder's input size
    config.area_min = 0.08  # smallest crop area fraction
    config.flip = True
    config.color_jitter_strength = 1.0  # s: brightness/contrast/saturation 0.8s, hue 0.2s
    config.color_jitter_prob = 0.8
    config.grayscale_prob = 0.2
    config.blur_prob = 0.5  # 0 for CIFAR-size images
    config.solarize_prob = 0.0
    return config


# The augment-config fields (sorted), derived from `default_augment_config`.
AUGMENT_KEYS: tuple[str, ...] = tuple(default_augment_config(1).to_dict())


def _augment_section(config: Mapping) -> Mapping:
    """Returns `config.augment` when given a full config, else `config` itself."""
    return config["augment"] if "augment" in config else config


def validate_augment_config(config: Mapping) -> None:
    """Raises ValueError naming the key if an augment config (or a config's `.augment`) is bad."""
    cfg = _augment_section(config)
    keys = set(cfg.keys())
    missing = [k for k in AUGMENT_KEYS if k not in keys]
    if missing:
        raise ValueError(f"augment config is missing {missing}; expected keys {list(AUGMENT_KEYS)}")
    unknown = sorted(keys - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"augment config has unknown keys {unknown}; allowed {list(AUGMENT_KEYS)}")

    def number(name: str) -> float:
        value = cfg[name]
        # bool is an int subclass, but `blur_prob=True` is almost surely a mistake.
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"augment.{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise ValueError(f"augment.{name}={value!r} must be finite")
        return float(value)

    for name in ("crop", "flip"):
        if not isinstance(cfg[name], bool | np.bool_):
            raise ValueError(f"augment.{name}={cfg[name]!r} must be a bool (True or False)")
    size = cfg["image_size"]
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size <= 0:
        raise ValueError(f"augment.image_size={size!r} must be an int > 0")
    area_min = number("area_min")
    if not 0.0 < area_min <= 1.0:
        raise ValueError(f"augment.area_min={area_min!r} must be in (0, 1]")
    strength = number("color_jitter_strength")
    if strength < 0.0:
        raise ValueError(f"augment.color_jitter_strength={strength!r} must be >= 0")
    for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        prob = number(name)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"augment.{name}={prob!r} must be a probability in [0, 1]")


def _simclr_view(
    key: jax.Array, image: jax.Array, cfg: Mapping, box: jax.Array | None = None
) -> jax.Array:
    """`simclr_view` on an already validated augment section; `box` replaces the random crop."""
    # Split every key up front, whatever is enabled, so turning one op off leaves the others'
    # randomness unchanged.
    k_crop, k_flip, k_jitter, k_gray, k_blur, k_solarize = jax.random.split(key, 6)
    image = image.astype(jnp.float32)
    size = cfg["image_size"]
    if box is not None:  # a window the host sampled on the original image (see `views`)
        image = resize_crop(image, box[0], box[1], box[2], box[3], size)
    elif cfg["crop"]:
        image = random_resized_crop(k_crop, image, size, area_range=(cfg["area_min"], 1.0))
    elif image.shape[:2] != (size, size):
        # Host crops of another size: resize the whole image.
        image = resize_crop(image, 0, 0, image.shape[0], image.shape[1], size)
    if cfg["flip"]:
        image = random_flip(k_flip, image)
    image = color_jitter(k_jitter, image, cfg["color_jitter_strength"], p=cfg["color_jitter_prob"])
    image = random_grayscale(k_gray, image, p=cfg["grayscale_prob"])
    image = random_gaussian_blur(k_blur, image, p=cfg["blur_prob"])
    image = random_solarize(k_solarize, image, p=cfg["solarize_prob"])
    return _clip(image)


def simclr_view(key: jax.Array, image: jax.Array, config: Mapping) -> jax.Array:
    """One SimCLR view `[S, S, 3]` of a float `[H, W, 3]` image in [0, 1].

    crop -> flip -> colour jitter -> colour drop -> blur -> solarize, as set by `config` (the
    augment section or a full config with `.augment`; see `default_augment_config`).
    """
    validate_augment_config(config)
    return _simclr_view(key, image, _augment_section(config))


def views(
    key: jax.Array,
    images: jax.Array,
    config: Mapping,
    num_views: int = 2,
    boxes: jax.Array | None = None,
) -> jax.Array:
    """SimCLR views `[num_views, B, S, S, 3]` of a batch, with independent keys per view and image.

    `images` is uint8 (scaled by 1/255) or float in [0, 1], either `[B, H, W, 3]` (every view
    augments the same image) or `[B, num_views, H, W, 3]` host crops (view v of example i augments
    `images[i, v]`; typically with `config.crop=False`). With `boxes` (float `[B, num_views, 4]`,
    `(y, x, h, w)` in pixels of `[B, H, W, 3]` images) view v of example i is cut out of
    `images[i]` at `boxes[i, v]` (bilinear, antialiased) instead of at a random crop: the host
    sampled the windows (`data` with `config.data.host_size`).
    """
    validate_augment_config(config)
    cfg = _augment_section(config)
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    else:
        images = images.astype(jnp.float32)
    if boxes is not None and (images.ndim != 4 or boxes.shape != (images.shape[0], num_views, 4)):
        raise ValueError(
            f"boxes {boxes.shape} must be [B, num_views, 4] = [{images.shape[0]}, {num_views}, 4] "
            f"for images [B, H, W, C]; got images {images.shape}"
        )
    if images.ndim == 5:
        if images.shape[1] != num_views:
            raise ValueError(
                f"host-cropped images {images.shape} have {images.shape[1]} views; "
                f"expected num_views={num_views}"
            )
        per_view = jnp.swapaxes(images, 0, 1)  # [V, B, H, W, C]
        image_axis = 0
    elif images.ndim == 4:
        per_view = images
        image_axis = None  # every view reads the same batch
    else:
        raise ValueError(f"images must be [B, H, W, C] or [B, V, H, W, C], got {images.shape}")
    batch = images.shape[0]
    keys = jax.random.split(key, (num_views, batch))  # works for raw and typed keys

    def one(k: jax.Array, image: jax.Array, box: jax.Array | None) -> jax.Array:
        return _simclr_view(k, image, cfg, box)

    if boxes is None:
        return jax.vmap(jax.vmap(one), in_axes=(0, image_axis, None))(keys, per_view, None)
    per_view_boxes = jnp.swapaxes(jnp.asarray(boxes, jnp.float32), 0, 1)  # [V, B, 4]
    return jax.vmap(jax.vmap(one), in_axes=(0, None, 0))(keys, per_view, per_view_boxes)
