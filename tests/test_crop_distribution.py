"""SimCLR's random-resized-crop distribution on the original image, host and device paths.

Host (`config.data.host_crop`): `data.crop_windows` is what the pipeline crops (checked on real
batches below, with the views cut on the host or, with `host_size`, on the device); its area and
aspect-ratio distributions are compared with an independent numpy implementation of TF's
`sample_distorted_bounding_box` algorithm. Device (`augment.crop_params`): compared on non-square
images with a numpy implementation of its documented (torchvision-style) algorithm; the square
case against the analytic mean is tests/test_augment.py's `test_crop_params_distribution`.
"""

import functools
import math

import jax
import ml_collections
import numpy as np
import pytest
from tiny import data_config

from simclr_jax import augment, data
from simclr_jax.data import streams

AREA = (0.08, 1.0)
ASPECT = (3 / 4, 4 / 3)
SHAPES = [(375, 500), (500, 375)]  # ImageNet's typical landscape and portrait (height, width)
N = 8000


def _no_augment(size: int) -> ml_collections.ConfigDict:
    """An augment config that only cuts out the views (every random op off)."""
    cfg = augment.default_augment_config(size)
    cfg.crop = cfg.flip = False
    cfg.color_jitter_prob = cfg.grayscale_prob = cfg.blur_prob = 0.0
    return cfg


def tf_reference_window(
    rng: np.random.Generator, height: int, width: int, attempts: int = 10
) -> tuple[int, int, int, int]:
    """(y, x, h, w) as TF's SampleDistortedBoundingBox samples it (whole image as the box)."""
    f32 = np.float32
    min_area, max_area = f32(AREA[0]) * width * height, f32(AREA[1]) * width * height
    for _ in range(attempts):
        aspect = f32(rng.random()) * f32(ASPECT[1] - ASPECT[0]) + f32(ASPECT[0])
        h = int(np.rint(np.sqrt(min_area / aspect)))
        max_h = int(np.rint(np.sqrt(max_area / aspect)))
        if np.rint(max_h * aspect) > width:  # largest height whose rounded width fits
            max_h = int((width + 0.5 - 1e-7) / aspect)
            max_h -= int(np.rint(max_h * aspect) > width)
        max_h = min(max_h, height)
        h = min(h, max_h)
        h += int(rng.integers(0, max_h - h + 1))  # height uniform among the allowed ones
        w = int(np.rint(h * aspect))
        if w * h < min_area:  # TF's two rounding repairs
            h += 1
            w = int(np.rint(h * aspect))
        if w * h > max_area:
            h -= 1
            w = int(np.rint(h * aspect))
        if not (min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height):
            continue
        y = int(rng.integers(0, height - h)) if h < height else 0
        x = int(rng.integers(0, width - w)) if w < width else 0
        return y, x, h, w
    return 0, 0, height, width


def rrc_reference_window(
    rng: np.random.Generator, height: int, width: int, attempts: int = 10
) -> tuple[int, int, int, int]:
    """(y, x, h, w) by augment.crop_params' documented algorithm: area and log-aspect uniform."""
    for _ in range(attempts):
        area = height * width * rng.uniform(*AREA)
        aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
        w, h = int(np.rint(math.sqrt(area * aspect))), int(np.rint(math.sqrt(area / aspect)))
        if 1 <= h <= height and 1 <= w <= width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def reference(sampler, height: int, width: int, seed: int = 0) -> np.ndarray:
    """N windows [N, 4] from a numpy reference sampler."""
    rng = np.random.default_rng(seed)
    return np.array([sampler(rng, height, width) for _ in range(N)])


def check_against_reference(windows: np.ndarray, ref: np.ndarray, height: int, width: int):
    """Ranges hold; area and log-aspect distributions match the reference's."""
    y, x, h, w = windows.T
    assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width))
    area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
    log_aspect, ref_log_aspect = np.log(w / h), np.log(ref[:, 3] / ref[:, 2])
    # Rounding h and w to pixels moves the area by < 2% and log(w/h) by < 0.01 at these sizes.
    assert 0.08 * 0.98 <= area.min() and area.max() <= 1.0
    assert area.min() < 0.1  # the low end of the range is reached (not cut at 10%)
    assert math.log(ASPECT[0]) - 0.01 <= log_aspect.min()
    assert log_aspect.max() <= math.log(ASPECT[1]) + 0.01
    assert abs(area.mean() - ref_area.mean()) < 0.02, (area.mean(), ref_area.mean())
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.03, q
    assert abs(log_aspect.mean() - ref_log_aspect.mean()) < 0.02
    # Roughly symmetric in log space (TF draws w/h uniform on [3/4, 4/3]: 57% above 1).
    assert abs(log_aspect.mean()) < 0.06
    assert abs((log_aspect > 0).mean() - (ref_log_aspect > 0).mean()) < 0.03
    assert 0.4 < (log_aspect > 0).mean() < 0.65


@pytest.mark.parametrize("height, width", SHAPES)
def test_host_crop_windows_match_tf_reference(height, width):
    windows = data.sample_crop_windows(height, width, seed=7, count=N // 2)
    assert windows.shape == (N // 2, 2, 4) and windows.dtype == np.int32
    assert np.any(windows[:, 0] != windows[:, 1], axis=1).mean() > 0.99  # independent views
    ref = reference(tf_reference_window, height, width)
    check_against_reference(windows.reshape(-1, 4), ref, height, width)


@pytest.mark.parametrize("height, width", SHAPES)
def test_device_crop_params_match_reference(height, width):
    keys = jax.random.split(jax.random.PRNGKey(3), N)
    sample = jax.jit(jax.vmap(lambda k: augment.crop_params(k, height, width, AREA, ASPECT)))
    windows = np.stack([np.asarray(a) for a in sample(keys)], axis=1)
    check_against_reference(windows, reference(rrc_reference_window, height, width), height, width)


@pytest.mark.parametrize("host_size", [0, 80])
@pytest.mark.parametrize("height, width", [(375, 500), (1200, 1600)])
def test_pipeline_crops_exactly_the_sampled_windows(tmp_path, height, width, host_size):
    """Views of ramp images show the window of `crop_windows` for their stream position.

    Red encodes the row and green the column linearly, so a view's mean locates its window's
    centre and its slope the window's size. JPEGs (union decode, DCT-scaled by 1/2..1/8 where
    both windows are that many times the 64 px view: most of them at 1200x1600) and PNGs (whole
    decode) mixed. With `host_size` the host sends the windows' union at 80 px and the device
    cuts the views out (`augment.views` with the batch's boxes): the composite must land on the
    same windows of the original image.
    """
    from PIL import Image

    size = 64
    # Scaled decodes round window edges to whole scaled pixels: up to 4 px at 1/8 scale.
    centre_tolerance = 4 * max(1.0, height / 375)
    rows, cols = np.mgrid[0:height, 0:width]
    ramp = np.stack(
        [rows * 255 / (height - 1), cols * 255 / (width - 1), np.full((height, width), 128)], -1
    )
    (tmp_path / "a").mkdir()
    for i in range(10):  # identical images: a window depends only on the shape and position
        image = Image.fromarray(np.round(ramp).astype(np.uint8))
        if i % 5 == 4:
            image.save(tmp_path / "a" / f"{i}.png")
        else:
            image.save(tmp_path / "a" / f"{i}.jpg", quality=100, subsampling=0)
    config = data_config(
        "image_folder",
        8,
        seed=3,
        image_size=size,
        folder=str(tmp_path),
        host_crop=True,
        host_size=host_size,
        prefetch=0,
        num_threads=1,
    )
    iterator = data.pretrain_iterator(config, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(4)]
    if host_size:
        assert batches[0]["image"].shape == (8, host_size, host_size, 3)
        assert batches[0]["crop"].shape == (8, 2, 4) and batches[0]["crop"].dtype == np.float32
        cut = jax.jit(functools.partial(augment.views, config=_no_augment(size)))
        batches = [
            {"image": 255 * np.swapaxes(cut(jax.random.key(0), b["image"], boxes=b["crop"]), 0, 1)}
            for b in batches
        ]
    views = np.concatenate([b["image"] for b in batches]).astype(np.float64)
    windows = data.sample_crop_windows(height, width, streams.host_seed(3, 0), len(views))
    lo, hi = size // 4, 3 * size // 4
    views, windows = views.reshape(-1, size, size, 3), windows.reshape(-1, 4)
    for view, (y, x, h, w) in zip(views, windows, strict=True):
        red, green = view[..., 0] * (height - 1) / 255, view[..., 1] * (width - 1) / 255
        # Bilinear resizing keeps a linear ramp linear; the window's edges map to the view's.
        assert abs(red.mean() + 0.5 - (y + h / 2)) < centre_tolerance
        assert abs(green.mean() + 0.5 - (x + w / 2)) < centre_tolerance
        assert abs((red[hi].mean() - red[lo].mean()) * size / (hi - lo) / h - 1) < 0.04
        assert abs((green[:, hi].mean() - green[:, lo].mean()) * size / (hi - lo) / w - 1) < 0.04
