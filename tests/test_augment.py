"""Tests for simclr_jax.augment: ranges, shapes, determinism, neutral settings, distributions."""

import colorsys
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tolerances import fp32_atol

from simclr_jax import augment

SIZE = 16


def _images() -> dict[str, jax.Array]:
    """Extreme and typical test images, 16x16x3."""
    rand = jax.random.uniform(jax.random.PRNGKey(42), (SIZE, SIZE, 3))
    return {
        "zeros": jnp.zeros((SIZE, SIZE, 3)),
        "ones": jnp.ones((SIZE, SIZE, 3)),
        "random": rand,
    }


def _all_on_config(image_size: int = 12) -> ml_collections.ConfigDict:
    """Every random op on, at full strength, so range checks exercise all of them."""
    cfg = augment.default_augment_config(image_size)
    cfg.color_jitter_strength = 1.5
    cfg.color_jitter_prob = 1.0
    cfg.grayscale_prob = 0.5
    cfg.blur_prob = 1.0
    cfg.solarize_prob = 0.5
    return cfg


def _all_off_config(image_size: int) -> ml_collections.ConfigDict:
    """No op active: views are then the (resized) inputs."""
    cfg = augment.default_augment_config(image_size)
    cfg.crop = False
    cfg.flip = False
    cfg.color_jitter_prob = 0.0
    cfg.grayscale_prob = 0.0
    cfg.blur_prob = 0.0
    cfg.solarize_prob = 0.0
    return cfg


def _every_random_op(key: jax.Array, image: jax.Array) -> dict[str, jax.Array]:
    """Each random op at aggressive settings, on one image."""
    keys = jax.random.split(key, 6)
    return {
        "crop": augment.random_resized_crop(keys[0], image, 12),
        "flip": augment.random_flip(keys[1], image, p=1.0),
        "jitter": augment.color_jitter(keys[2], image, strength=2.0, p=1.0),
        "gray": augment.random_grayscale(keys[3], image, p=1.0),
        "blur": augment.random_gaussian_blur(keys[4], image, p=1.0),
        "solarize": augment.random_solarize(keys[5], image, p=1.0),
        "bright": augment.adjust_brightness(image, 3.0),
        "contrast": augment.adjust_contrast(image, 3.0),
        "saturation": augment.adjust_saturation(image, 3.0),
        "hue": augment.adjust_hue(image, 0.37),
    }


def test_outputs_stay_in_unit_range():
    images = _images()
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    # One compile: 8 keys x 3 images (zeros, ones, random).
    per_key = jax.vmap(_every_random_op, in_axes=(0, None))
    outs = jax.jit(jax.vmap(per_key, in_axes=(None, 0)))(keys, jnp.stack(list(images.values())))
    for op, out in outs.items():
        assert out.dtype == jnp.float32, op
        assert bool(jnp.all(jnp.isfinite(out))), op
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0, op
        # Every op keeps black black (solarize too: 0 < threshold).
        np.testing.assert_allclose(out[0], 0.0, atol=1e-6, err_msg=op)
    assert outs["crop"].shape == (3, 8, 12, 12, 3)
    # White: solarize turns it black; crops, flips and blurs keep it white.
    np.testing.assert_allclose(outs["solarize"][1], 0.0, atol=1e-6)
    for op in ("crop", "flip", "blur", "bright", "contrast", "saturation", "hue"):
        np.testing.assert_allclose(outs[op][1], 1.0, atol=1e-5, err_msg=op)
    # Random crops of a random image differ between keys.
    assert float(jnp.abs(outs["crop"][2, 0] - outs["crop"][2, 1]).max()) > 1e-2


def test_random_resized_crop_shape_jit_and_vmap_agree():
    image = jax.random.uniform(jax.random.PRNGKey(1), (20, 24, 3))
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    crop = functools.partial(augment.random_resized_crop, size=SIZE)
    batched = jax.jit(jax.vmap(crop, in_axes=(0, None)))(keys, image)
    assert batched.shape == (4, SIZE, SIZE, 3)
    single = jax.jit(crop)(keys[3], image)
    np.testing.assert_allclose(batched[3], single, atol=1e-5)
    assert float(jnp.abs(batched[0] - batched[1]).max()) > 1e-2


def test_resized_crop_full_area_square_is_identity():
    image = jax.random.uniform(jax.random.PRNGKey(3), (SIZE, SIZE, 3))
    out = augment.random_resized_crop(
        jax.random.PRNGKey(4), image, SIZE, area_range=(1.0, 1.0), aspect_range=(1.0, 1.0)
    )
    np.testing.assert_allclose(out, image, atol=1e-5)
    np.testing.assert_allclose(augment.resize_crop(image, 0, 0, SIZE, SIZE, SIZE), image, atol=1e-5)


def test_resize_crop_takes_the_window():
    # A 2x upscale of the top-left 8x8 quarter: output pixel pairs average back to the window.
    image = jax.random.uniform(jax.random.PRNGKey(5), (SIZE, SIZE, 3))
    out = augment.resize_crop(image, 4, 8, 8, 8, SIZE)
    window = image[4:12, 8:16]
    # Bilinear 2x upsampling preserves the mean of the window up to edge effects.
    assert abs(float(out.mean()) - float(window.mean())) < 2e-2
    # A same-size window crop (scale 1, integer shift) is an exact copy.
    same = augment.resize_crop(jnp.pad(image, ((3, 0), (5, 0), (0, 0))), 3, 5, SIZE, SIZE, SIZE)
    np.testing.assert_allclose(same, image, atol=1e-5)


def test_crop_params_distribution():
    n, side = 4000, 224
    keys = jax.random.split(jax.random.PRNGKey(6), n)
    sample = jax.jit(jax.vmap(lambda k: augment.crop_params(k, side, side)))
    y0, x0, h, w = (np.asarray(a) for a in sample(keys))
    assert y0.dtype == np.int32 and h.dtype == np.int32
    assert np.all(y0 >= 0) and np.all(x0 >= 0)
    assert np.all(y0 + h <= side) and np.all(x0 + w <= side)
    area = h * w / side**2
    aspect = w / h
    # Rounding w and h to whole pixels moves the area and aspect by under ~1%.
    assert area.min() >= 0.08 * 0.98 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= (4 / 3) * 1.01
    # A crop fits iff area <= min(r, 1/r) = exp(-|log r|) =: m, |log r| ~ U[0, L]. Given fitting,
    # area ~ U[0.08, m], so E[area] = E[(m^2 - 0.08^2) / 2] / E[m - 0.08] (all 10 attempts
    # failing has probability ~1e-8).
    big_l = math.log(4 / 3)
    e_m = (1 - math.exp(-big_l)) / big_l
    e_m2 = (1 - math.exp(-2 * big_l)) / (2 * big_l)
    analytic = (e_m2 - 0.08**2) / 2 / (e_m - 0.08)
    assert 0.45 < area.mean() < 0.6
    assert abs(area.mean() - analytic) < 0.015, (area.mean(), analytic)
    # Offsets spread over the valid range (not pinned to the corner or centre).
    small = h < side // 2
    rel = y0[small] / (side - h[small])
    assert 0.4 < rel.mean() < 0.6 and rel.min() < 0.05 and rel.max() > 0.95


def test_crop_params_fall_back_to_whole_image():
    # An area range that can never fit (aspect far from 1 on a square image and area 1).
    y0, x0, h, w = augment.crop_params(jax.random.PRNGKey(7), 10, 10, (1.0, 1.0), (3.0, 4.0), 5)
    assert (int(y0), int(x0), int(h), int(w)) == (0, 0, 10, 10)


def test_flip_frequency_and_content():
    image = jax.random.uniform(jax.random.PRNGKey(8), (4, 6, 3))
    keys = jax.random.split(jax.random.PRNGKey(9), 2000)
    outs = jax.jit(jax.vmap(augment.random_flip, in_axes=(0, None)))(keys, image)
    flipped = np.all(np.isclose(outs, image[:, ::-1]), axis=(1, 2, 3))
    same = np.all(np.isclose(outs, image), axis=(1, 2, 3))
    assert np.all(flipped ^ same)  # every output is exactly one of the two
    assert 0.45 < flipped.mean() < 0.55


@jax.jit
def _neutral_ops(key: jax.Array, image: jax.Array) -> dict[str, jax.Array]:
    """Every op at its neutral setting (one compile)."""
    return {
        "brightness": augment.adjust_brightness(image, 1.0),
        "contrast": augment.adjust_contrast(image, 1.0),
        "saturation": augment.adjust_saturation(image, 1.0),
        "hue": augment.adjust_hue(image, 0.0),
        "hue_full_turn": augment.adjust_hue(image, 1.0),
        "blur_tiny_sigma": augment.gaussian_blur(image, 0.05, 3),
        "blur_zero_sigma": augment.gaussian_blur(image, 0.0, 5),
        "solarize_above_1": augment.solarize(image, 1.01),
        "flip_p0": augment.random_flip(key, image, p=0.0),
        "jitter_p0": augment.color_jitter(key, image, 1.0, p=0.0),
        "jitter_strength0": augment.color_jitter(key, image, 0.0, p=1.0),
        "gray_p0": augment.random_grayscale(key, image, p=0.0),
        "blur_p0": augment.random_gaussian_blur(key, image, p=0.0),
        "solarize_p0": augment.random_solarize(key, image, p=0.0),
        "solarize_default": augment.random_solarize(key, image),
        # A traced p of 0 takes the random-draw path rather than the static shortcut.
        "flip_traced_p0": augment.random_flip(key, image, p=jnp.float32(0.0)),
        "blur_traced_p0": augment.random_gaussian_blur(key, image, p=jnp.float32(0.0)),
    }


def test_neutral_settings_are_identity():
    image = _images()["random"]
    for name, out in _neutral_ops(jax.random.PRNGKey(10), image).items():
        np.testing.assert_allclose(out, image, atol=1e-5, err_msg=name)


def test_ops_with_p1_apply():
    image = _images()["random"]
    key = jax.random.PRNGKey(11)
    np.testing.assert_allclose(
        augment.random_grayscale(key, image, p=1.0), augment.to_grayscale(image), atol=1e-6
    )
    np.testing.assert_allclose(augment.random_solarize(key, image, p=1.0), augment.solarize(image))
    np.testing.assert_allclose(augment.random_flip(key, image, p=1.0), image[:, ::-1])
    blurred = augment.random_gaussian_blur(key, image, p=1.0)
    assert float(blurred.std()) < 0.9 * float(image.std())


def test_colour_ops_known_values():
    image = _images()["random"]
    np.testing.assert_allclose(augment.adjust_brightness(image, 0.5), image * 0.5, atol=1e-6)
    # Contrast 0 gives the uniform image at the mean luma; saturation 0 gives the grayscale.
    luma_mean = float(jnp.mean(image @ jnp.array([0.2989, 0.5870, 0.1140])))
    np.testing.assert_allclose(augment.adjust_contrast(image, 0.0), luma_mean, atol=1e-6)
    np.testing.assert_allclose(
        augment.adjust_saturation(image, 0.0), augment.to_grayscale(image), atol=1e-6
    )
    # Contrast 1.5 scales every distance to the mean luma by 1.5 (then clips).
    mid = 0.25 + 0.5 * image
    mid_mean = float(jnp.mean(mid @ jnp.array([0.2989, 0.5870, 0.1140])))
    np.testing.assert_allclose(
        augment.adjust_contrast(mid, 1.5),
        np.clip(mid_mean + 1.5 * (mid - mid_mean), 0, 1),
        atol=1e-6,
    )
    # A third of a turn maps red -> green -> blue; half a turn maps red to cyan.
    red = jnp.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(augment.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-5)
    np.testing.assert_allclose(augment.adjust_hue(red, -1 / 3), [[[0.0, 0.0, 1.0]]], atol=1e-5)
    np.testing.assert_allclose(augment.adjust_hue(red, 0.5), [[[0.0, 1.0, 1.0]]], atol=1e-5)
    # Hue rotation keeps HSV value and saturation.
    hsv = augment.rgb_to_hsv(image)
    hsv_rot = augment.rgb_to_hsv(augment.adjust_hue(image, 0.2))
    np.testing.assert_allclose(hsv_rot[..., 1:], hsv[..., 1:], atol=1e-5)
    np.testing.assert_allclose((hsv_rot[..., 0] - hsv[..., 0]) % 1.0, 0.2, atol=1e-4)


def test_grayscale_luma_on_primaries():
    primaries = jnp.eye(3).reshape(1, 3, 3)  # pixels: red, green, blue
    gray = augment.to_grayscale(primaries)
    assert gray.shape == (1, 3, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_allclose(gray[0, :, 0], [0.2989, 0.5870, 0.1140], atol=1e-6)
    white = augment.to_grayscale(jnp.ones((2, 2, 3)))
    np.testing.assert_allclose(white, 0.9999, atol=1e-6)  # the luma weights sum to 0.9999


def test_hsv_round_trip_and_reference():
    rgb = jax.random.uniform(jax.random.PRNGKey(12), (64, 3))
    # Add the corner cases: black, white, gray and the primaries/secondaries.
    corners = jnp.array(
        [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]],
        dtype=jnp.float32,
    )
    rgb = jnp.concatenate([rgb, corners])
    hsv = augment.rgb_to_hsv(rgb)
    np.testing.assert_allclose(augment.hsv_to_rgb(hsv), rgb, atol=1e-5)
    expected = np.array([colorsys.rgb_to_hsv(*px) for px in np.asarray(rgb, dtype=np.float64)])
    np.testing.assert_allclose(hsv, expected, atol=1e-5)
    np.testing.assert_allclose(hsv[-4:-1], [[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1]], atol=1e-6)


def test_gaussian_blur_preserves_constants_and_mean():
    assert [augment.blur_kernel_size(s) for s in (16, 32, 64, 224)] == [3, 3, 7, 23]
    const = jnp.full((SIZE, SIZE, 3), 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(const, 2.0, 7), const, atol=1e-6)
    np.testing.assert_allclose(augment.gaussian_blur(jnp.ones((8, 8, 3)), 3.0, 9), 1.0, atol=1e-6)
    image = _images()["random"]
    for sigma, ksize in ((0.5, 3), (1.5, 5), (2.0, 7)):
        blurred = augment.gaussian_blur(image, sigma, ksize)
        assert blurred.shape == image.shape
        assert abs(float(blurred.mean()) - float(image.mean())) < 1e-2
        assert float(blurred.std()) < float(image.std())
    # Larger sigma blurs more.
    stds = [float(augment.gaussian_blur(image, s, 7).std()) for s in (0.5, 1.0, 2.0)]
    assert stds[0] > stds[1] > stds[2]
    # Separable: blurring a single bright pixel gives the outer product of the 1-D kernel.
    impulse = jnp.zeros((9, 9, 3)).at[4, 4].set(1.0)
    out = augment.gaussian_blur(impulse, 1.0, 5)
    k1 = np.exp(-(np.arange(-2, 3) ** 2) / 2.0)
    k1 /= k1.sum()
    np.testing.assert_allclose(out[2:7, 2:7, 0], np.outer(k1, k1), atol=1e-6)


def test_solarize_values():
    x = jnp.array([0.0, 0.2, 0.49, 0.5, 0.7, 1.0]).reshape(1, 2, 3)
    np.testing.assert_allclose(
        augment.solarize(x).ravel(), [0.0, 0.2, 0.49, 0.5, 0.3, 0.0], atol=1e-6
    )


def test_color_jitter_params_ranges_and_order_varies():
    keys = jax.random.split(jax.random.PRNGKey(13), 500)
    sample = jax.jit(jax.vmap(augment.color_jitter_params, in_axes=(0, None)))
    b, c, s, h, order = (np.asarray(a) for a in sample(keys, 0.5))
    for factor in (b, c, s):
        assert factor.min() >= 0.6 and factor.max() <= 1.4
        assert factor.min() < 0.65 and factor.max() > 1.35  # spans the range
    assert h.min() >= -0.1 and h.max() <= 0.1 and h.min() < -0.09 and h.max() > 0.09
    assert np.all(np.sort(order, axis=1) == np.arange(4))  # permutations
    orders = {tuple(o) for o in order}
    assert len(orders) >= 20  # of 24; each missing with probability ~1e-9
    # Strength 2: the lower bound clamps at 0.
    b2 = np.asarray(sample(keys, 2.0)[0])
    assert b2.min() >= 0.0 and b2.max() <= 2.6 and b2.min() < 0.1
    # Without random order the order is fixed.
    fixed = augment.color_jitter_params(keys[0], 1.0, random_order=False)[4]
    np.testing.assert_array_equal(fixed, [0, 1, 2, 3])


def test_color_jitter_applies_sampled_params_in_sampled_order():
    image = _images()["random"]
    key = jax.random.PRNGKey(14)
    _, k_params = jax.random.split(key)
    params = augment.color_jitter_params(k_params, 1.0)
    expected = augment.apply_color_ops(image, *params)
    # The 4 ops in float32, contrast with a mean over the 16 x 16 pixels (tests/tolerances.py).
    tol = fp32_atol(expected, SIZE * SIZE, 4)
    np.testing.assert_allclose(augment.color_jitter(key, image, 1.0, p=1.0), expected, atol=tol)
    # The order matters: the same factors in two orders give different images.
    b, c, s, h = 1.5, 0.4, 1.8, 0.15
    one = augment.apply_color_ops(image, b, c, s, h, jnp.array([0, 1, 2, 3]))
    other = augment.apply_color_ops(image, b, c, s, h, jnp.array([3, 2, 1, 0]))
    assert float(jnp.abs(one - other).max()) > 1e-2
    # And apply_color_ops with the identity order is the ops composed by hand.
    by_hand = augment.adjust_hue(
        augment.adjust_saturation(
            augment.adjust_contrast(augment.adjust_brightness(image, b), c), s
        ),
        h,
    )
    np.testing.assert_allclose(one, by_hand, atol=fp32_atol(by_hand, SIZE * SIZE, 4))


def test_apply_color_ops_every_order_equals_ops_composed_by_hand():
    # Vmapped over all 24 orders at once, as `views` runs it (order differs per image).
    image = _images()["random"]
    b, c, s, h = 1.5, 0.4, 1.8, 0.15
    ops = [
        lambda x: augment.adjust_brightness(x, b),
        lambda x: augment.adjust_contrast(x, c),
        lambda x: augment.adjust_saturation(x, s),
        lambda x: augment.adjust_hue(x, h),
    ]
    orders = np.array(list(itertools.permutations(range(4))), np.int32)
    apply = jax.jit(jax.vmap(augment.apply_color_ops, in_axes=(None,) * 5 + (0,)))
    got = np.asarray(apply(image, b, c, s, h, orders))
    for order, out in zip(orders, got, strict=True):
        expected = image
        for op in order:
            expected = ops[op](expected)
        # 4 float32 ops, contrast with a mean over 16 x 16 pixels (tests/tolerances.py).
        tol = fp32_atol(expected, SIZE * SIZE, 4)
        np.testing.assert_allclose(out, expected, atol=tol, err_msg=str(order))


def test_color_jitter_probability():
    image = _images()["random"]
    keys = jax.random.split(jax.random.PRNGKey(15), 1000)
    outs = jax.jit(jax.vmap(augment.color_jitter, in_axes=(0, None, None)))(keys, image, 1.0)
    unchanged = np.all(np.asarray(outs) == np.asarray(image), axis=(1, 2, 3))
    assert 0.15 < unchanged.mean() < 0.25  # p = 0.8 default


# One compile per input layout for the `views` tests.
_VIEW_CONFIG = _all_on_config(image_size=12)
_views_jit = jax.jit(functools.partial(augment.views, config=_VIEW_CONFIG))


def test_views_uint8_shape_range_determinism():
    # Batch: black, white, random.
    batch = np.random.default_rng(0).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    batch[0], batch[1] = 0, 255
    out = _views_jit(jax.random.PRNGKey(16), batch)
    assert out.shape == (2, 3, 12, 12, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_allclose(out[:, 0], 0.0, atol=1e-6)  # black stays black
    assert float(out[:, 2].std()) > 1e-2
    again = _views_jit(jax.random.PRNGKey(16), batch)
    np.testing.assert_array_equal(out, again)  # same key, same views
    other = _views_jit(jax.random.PRNGKey(17), batch)
    assert float(jnp.abs(out - other).max()) > 0.1  # different key, different views
    # Independent keys per (view, example): the two views of an image differ, as do examples.
    assert float(jnp.abs(out[0] - out[1]).max()) > 0.1
    # simclr_view on one image with the same key as views' split gives the same view.
    keys = jax.random.split(jax.random.PRNGKey(16), (2, 3))
    single = jax.jit(functools.partial(augment.simclr_view, config=_VIEW_CONFIG))(
        keys[1, 2], jnp.asarray(batch[2], jnp.float32) / 255.0
    )
    np.testing.assert_allclose(single, out[1, 2], atol=1e-5)


def test_views_uint8_and_float_inputs_agree():
    cfg = _all_off_config(SIZE)
    batch = np.random.default_rng(1).integers(0, 256, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    key = jax.random.PRNGKey(18)
    run = jax.jit(functools.partial(augment.views, config=cfg))
    from_uint8 = run(key, batch)
    from_float = run(key, batch.astype(np.float32) / 255.0)
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)
    # With every op off both views are the input image.
    np.testing.assert_allclose(from_uint8[0], batch / 255.0, atol=1e-6)
    np.testing.assert_allclose(from_uint8[1], batch / 255.0, atol=1e-6)


def test_views_host_cropped_input():
    rng = np.random.default_rng(2)
    host = rng.integers(0, 256, size=(3, 2, SIZE, SIZE, 3), dtype=np.uint8)
    cfg = _all_off_config(SIZE)
    out = augment.views(jax.random.PRNGKey(19), host, cfg)
    assert out.shape == (2, 3, SIZE, SIZE, 3)
    # View v of example i comes from images[i, v].
    np.testing.assert_allclose(out, np.swapaxes(host, 0, 1) / 255.0, atol=1e-6)
    # With augmentation on (and no device crop) the shape is the same and views are random.
    cfg_on = _all_on_config(SIZE)
    cfg_on.crop = False
    aug = jax.jit(functools.partial(augment.views, config=cfg_on))(jax.random.PRNGKey(19), host)
    assert aug.shape == (2, 3, SIZE, SIZE, 3)
    assert float(jnp.abs(aug - out).max()) > 0.1
    with pytest.raises(ValueError, match="num_views"):
        augment.views(jax.random.PRNGKey(19), host, cfg, num_views=3)


def test_views_accepts_full_config_and_typed_keys():
    full = ml_collections.ConfigDict({"seed": 0, "augment": _all_off_config(SIZE)})
    images = jax.random.uniform(jax.random.PRNGKey(20), (2, SIZE, SIZE, 3))
    out = jax.jit(functools.partial(augment.views, config=full))(jax.random.key(0), images)
    assert out.shape == (2, 2, SIZE, SIZE, 3)
    np.testing.assert_allclose(out[0], images, atol=1e-6)
    augment.validate_augment_config(full)
    augment.validate_augment_config(augment.default_augment_config(224))


def test_default_augment_config_fields():
    cfg = augment.default_augment_config(224)
    assert dict(cfg) == {
        "crop": True,
        "image_size": 224,
        "area_min": 0.08,
        "flip": True,
        "color_jitter_strength": 1.0,
        "color_jitter_prob": 0.8,
        "grayscale_prob": 0.2,
        "blur_prob": 0.5,
        "solarize_prob": 0.0,
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_size", 0),
        ("image_size", 12.5),
        ("area_min", 0.0),
        ("area_min", 1.5),
        ("color_jitter_strength", -0.1),
        ("color_jitter_strength", float("nan")),
        ("color_jitter_prob", 1.2),
        ("grayscale_prob", -0.1),
        ("blur_prob", 2.0),
        ("solarize_prob", "0.1"),
        ("crop", 1),
        ("flip", "yes"),
    ],
)
def test_bad_config_raises_naming_key(key, value):
    cfg = augment.default_augment_config(SIZE)
    # ConfigDict enforces the field's type on assignment, so build the bad config as a dict.
    bad = dict(cfg)
    bad[key] = value
    with pytest.raises(ValueError, match=key):
        augment.validate_augment_config(bad)
    with pytest.raises(ValueError, match=key):
        augment.views(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), bad)


def test_missing_and_unknown_config_keys_raise():
    cfg = dict(augment.default_augment_config(SIZE))
    del cfg["blur_prob"]
    with pytest.raises(ValueError, match="blur_prob"):
        augment.validate_augment_config(cfg)
    cfg = dict(augment.default_augment_config(SIZE), blur_p=0.5)
    with pytest.raises(ValueError, match="blur_p"):
        augment.simclr_view(jax.random.PRNGKey(0), jnp.zeros((SIZE, SIZE, 3)), cfg)


def test_views_cut_host_sampled_boxes():
    rng = np.random.default_rng(3)
    union = rng.integers(0, 256, size=(2, 24, 20, 3), dtype=np.uint8)
    boxes = np.array(
        [[[0, 0, 24, 20], [4.5, 2.0, 8.0, 12.0]], [[1, 3, 10, 10], [0, 0, 24, 20]]], np.float32
    )
    cfg = _all_off_config(SIZE)
    out = jax.jit(functools.partial(augment.views, config=cfg))(
        jax.random.PRNGKey(0), union, boxes=boxes
    )
    assert out.shape == (2, 2, SIZE, SIZE, 3)
    # View v of example i is box [i, v] of images[i], resized as augment.resize_crop does.
    for i in range(2):
        for v in range(2):
            expected = augment.resize_crop(union[i] / 255.0, *boxes[i, v], SIZE)
            # Separable resampling: sums over <= 24 source pixels per axis and the weights'
            # normalisation, 3 reductions deep (tests/tolerances.py).
            np.testing.assert_allclose(out[v, i], expected, atol=fp32_atol(expected, 24, 3))
    # The random crop is replaced by the boxes even with config.crop on.
    cfg.crop = True
    again = augment.views(jax.random.PRNGKey(0), union, cfg, boxes=boxes)
    np.testing.assert_allclose(again, out, atol=fp32_atol(out, 24, 3))
    with pytest.raises(ValueError, match="boxes"):
        augment.views(jax.random.PRNGKey(0), union, cfg, boxes=boxes[:, :1])
