"""Augmentation preview: grid geometry, and views that differ from their source and each other."""

import os

import numpy as np
from matplotlib import image as mpimg

from configs import digits
from simclr_jax.outputs import preview


def small_config():
    """The digits config (its augmentation settings) at 8 px, so the test runs in seconds."""
    c = digits.get_config()
    c.data.image_size = c.augment.image_size = 8
    return c


def test_preview_grid_pixels_and_views_differ(tmp_path):
    config = small_config()
    n, k, size = 3, 4, 8
    path = preview.preview_augment(config, str(tmp_path), num_images=n, num_views=k, seed=1)
    assert path == os.path.join(tmp_path, "report", "augment.png")
    grid = mpimg.imread(path)
    cell = size * preview.cell_scale(size)
    assert cell >= 96
    height = preview.PAD + n * (cell + preview.PAD)
    width = preview.PAD + (1 + k) * (cell + preview.PAD) + preview.SEP
    assert grid.shape[:2] == (height, width) == preview.grid_size(n, k, cell)

    # Read the cells back from the PNG: what a user sees.
    cells = np.zeros((n, 1 + k, cell, cell, 3))
    for i in range(n):
        for j in range(1 + k):
            y, x = preview.cell_origin(i, j, cell)
            cells[i, j] = grid[y : y + cell, x : x + cell, :3]
    for i in range(n):
        assert cells[i, 0].std() > 0.05  # the source is a digit, not a blank cell
        for j in range(1, 1 + k):
            assert np.abs(cells[i, j] - cells[i, 0]).mean() > 0.01, (i, j)
            for jj in range(j + 1, 1 + k):
                assert np.abs(cells[i, j] - cells[i, jj]).mean() > 0.01, (i, j, jj)
    # Rows show different source images.
    assert np.abs(cells[0, 0] - cells[1, 0]).mean() > 0.01


def test_views_are_seeded_and_use_the_config():
    config = small_config()
    images = (np.random.default_rng(0).uniform(size=(2, 8, 8, 3)) * 255).astype(np.uint8)
    src, a = preview.make_views(config, images, num_views=3, seed=5)
    _, b = preview.make_views(config, images, num_views=3, seed=5)
    _, c = preview.make_views(config, images, num_views=3, seed=6)
    assert a.shape == (2, 3, 8, 8, 3) and src.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    np.testing.assert_allclose(src, images / 255.0, atol=1e-6)
    # With every augmentation off, a view is its source: the preview shows the config's effect.
    off = small_config()
    off.augment.crop = False
    off.augment.color_jitter_prob = 0.0
    _, same = preview.make_views(off, images, num_views=2)
    np.testing.assert_allclose(same, np.stack([src, src], axis=1), atol=1e-6)


def test_preview_augment_mode(tmp_path):
    from simclr_jax import modes

    path = modes.run("preview_augment", small_config(), str(tmp_path), False)
    cell = 8 * preview.cell_scale(8)
    assert mpimg.imread(path).shape[:2] == preview.grid_size(8, 6, cell)


def test_host_size_preview_shows_training_views(tmp_path):
    """With data.host_size the rows are the pipeline's unions and the two views cut from them."""
    from PIL import Image
    from tiny import tiny_config

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
    config = tiny_config("imagenet", dataset="image_folder")
    config.data.folder = str(tmp_path / "images")
    config.data.host_size = 12
    sources, views = preview.training_views(config, num_images=3, seed=1)
    assert sources.shape == (3, 8, 8, 3) and views.shape == (3, 2, 8, 8, 3)
    assert np.abs(views[:, 0] - views[:, 1]).mean() > 0.01
    path = preview.preview_augment(config, str(tmp_path / "run"), num_images=3, num_views=6)
    cell = 8 * preview.cell_scale(8)
    assert mpimg.imread(path).shape[:2] == preview.grid_size(3, 2, cell)
