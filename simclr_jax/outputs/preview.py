"""Augmentation preview: a grid of source images and their SimCLR views, before a long run.

    python -m simclr_jax.main --config=configs/digits.py --workdir=runs/digits \\
        --mode=preview_augment

writes `runs/digits/report/augment.png`: one row per source image, the source in the first
column (after it a wider gap), then the views made by `augment.views`, the function the train
step calls, with the run's `config.augment`. Change `--config.augment.*` and rerun to see the
effect of a setting.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import augment

log = logging.getLogger(__name__)

PREVIEW_FILE = "augment.png"
PAD = 4  # pixels between cells
SEP = 8  # extra pixels between the source column and the views
_MIN_CELL = 96  # small images are enlarged (nearest neighbour) to at least this many pixels
_BACKGROUND = 255


def cell_scale(size: int) -> int:
    """Integer enlargement of a `size`-pixel image in the grid (at least _MIN_CELL pixels)."""
    return max(1, -(-_MIN_CELL // size))


def cell_origin(row: int, col: int, cell: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of grid cell (row, col) for cells of `cell` pixels."""
    return PAD + row * (cell + PAD), PAD + col * (cell + PAD) + (SEP if col > 0 else 0)


def grid_size(num_images: int, num_views: int, cell: int) -> tuple[int, int]:
    """(height, width) in pixels of the grid of `num_images` rows and `1 + num_views` columns."""
    return PAD + num_images * (cell + PAD), PAD + (1 + num_views) * (cell + PAD) + SEP


def _at_side(images: jax.Array, size: int) -> jax.Array:
    """uint8 `[B, H, W, 3]` as float [0, 1] `[B, size, size, 3]` (resized when H, W differ)."""
    src = images.astype(jnp.float32) / 255.0
    if src.shape[1:3] != (size, size):
        h, w = src.shape[1:3]
        src = jax.vmap(lambda im: augment.resize_crop(im, 0, 0, h, w, size))(src)
    return src


def make_views(
    config: ml_collections.ConfigDict,
    images: np.ndarray,
    num_views: int,
    seed: int = 0,
    boxes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sources and views as float [0, 1]: `[B, S, S, 3]` and `[B, num_views, S, S, 3]`.

    Views come from `augment.views` with `config.augment` (training's code path; `boxes` are
    host-sampled crop windows, see `data.host_size`); sources are resized to the views' side S
    when they differ, so they can sit in the same grid.
    """
    size = config.augment.image_size

    @functools.partial(jax.jit, static_argnums=2)
    def run(
        key: jax.Array, images: jax.Array, num_views: int, boxes: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        v = augment.views(key, images, config.augment, num_views, boxes=boxes)  # [V, B, S, S, 3]
        return _at_side(images, size), jnp.swapaxes(v, 0, 1)

    src, views = run(jax.random.key(seed), jnp.asarray(images, jnp.uint8), num_views, boxes)
    return np.asarray(src), np.asarray(views)


def training_views(
    config: ml_collections.ConfigDict, num_images: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training's own two views of the first `num_images` pretraining images (`data.host_size`).

    Sources are the unions of the two windows the host samples on each original image; the
    views are cut at those windows and augmented, as in the train step.
    """
    from simclr_jax import data

    small = config.copy_and_resolve_references()
    with small.unlocked():
        small.batch_size = num_images
        small.data.prefetch = 0
    batch = next(data.pretrain_iterator(small, process_index=0, process_count=1))
    return make_views(config, batch["image"], 2, seed, boxes=batch["crop"])


def make_grid(sources: np.ndarray, views: np.ndarray) -> np.ndarray:
    """uint8 RGB grid `[H, W, 3]`: row i is sources[i] then views[i, 0..V-1] (see `grid_size`)."""
    num_images, num_views, size = views.shape[0], views.shape[1], views.shape[2]
    scale = cell_scale(size)
    cell = size * scale
    grid = np.full((*grid_size(num_images, num_views, cell), 3), _BACKGROUND, np.uint8)
    for i in range(num_images):
        for j, image in enumerate([sources[i], *views[i]]):
            pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
            pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
            y, x = cell_origin(i, j, cell)
            grid[y : y + cell, x : x + cell] = pixels
    return grid


def preview_augment(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_images: int = 8,
    num_views: int = 6,
    seed: int = 0,
) -> str:
    """Writes `workdir/report/augment.png` (sources + seeded SimCLR views); returns its path.

    With `data.host_crop` and `data.host_size` the rows are training's own two views of the
    first pretraining images, next to the union of their windows (`training_views`).
    """
    from simclr_jax import data

    if data.modality(config.dataset) != "image":
        raise ValueError(
            f"--mode=preview_augment shows image augmentations; config.dataset="
            f"{config.dataset!r} is text (CLEAR's augmentations on token ids: augment_text)"
        )
    if num_images < 1 or num_views < 1:
        raise ValueError(f"num_images={num_images} and num_views={num_views} must be >= 1")
    augment.validate_augment_config(config.augment)
    if config.data.host_crop and config.data.host_size:
        if num_views != 2:
            log.info("data.host_size: the host samples 2 crop windows per image; showing 2 views")
        sources, views = training_views(config, num_images, seed)
    else:
        if config.data.host_crop:
            log.warning(
                "data.host_crop with host_size=0: training crops on the host while decoding; the "
                "preview shows the device-side augmentations of centre crops only"
            )
        # Read only the images shown: a tfds split is not decoded whole for a preview.
        small = config.copy_and_resolve_references()
        with small.unlocked():
            small.data.eval_max_examples = num_images
        images, _ = data.eval_arrays(small, "train")
        sources, views = make_views(config, images[:num_images], num_views, seed)
    grid = make_grid(sources, views)

    from matplotlib import image as mpimg

    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, PREVIEW_FILE)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    mpimg.imsave(tmp, grid)  # the array's pixels exactly: no axes, no resampling
    os.replace(tmp, path)
    return path
