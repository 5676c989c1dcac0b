"""Host-side decoding: SimCLR's random resized crop windows and JPEG decoding inside them.

Random crops use stateless ops seeded by the record's position in the host's stream, so parallel
decoding does not change them. With host crops a JPEG is decoded once, inside the union of its two
crop windows (`crop_windows`); evaluation decodes only the centre window.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from simclr_jax.data.datasets import import_tf

# The host's random resized crop: SimCLR's ranges, sampled by TF's algorithm on the original image.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_NUM_VIEWS = 2
# libjpeg decodes whole MCUs (8 or 16 px wide); a window starting on that grid is decoded straight
# into the output, one starting elsewhere costs TF an extra copy of every row.
_JPEG_MCU_WIDTH = 16


def crop_windows(image_shape: Any, seed: Any, position: Any) -> Any:
    """The host crop windows int32 [2, 4] (y, x, h, w) of record `position` (TF tensors).

    View v of the record at `position` in a host's stream seeded `seed` is
    `tf.image.stateless_sample_distorted_bounding_box` on the whole image of `image_shape`
    ([H, W, ...]) with seed `[seed, 2 * position + v]`: aspect ratio w/h uniform in 3/4..4/3, then
    the height uniform among those giving an area of 8%..100%, the offset uniform. The pipeline
    crops exactly these windows; `sample_crop_windows` evaluates them for tests.
    """
    tf = import_tf()
    windows = []
    for view in range(_NUM_VIEWS):
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            image_shape,
            tf.zeros([1, 0, 4]),
            seed=tf.stack(
                [tf.cast(seed, tf.int64), _NUM_VIEWS * tf.cast(position, tf.int64) + view]
            ),
            # The default 0.1 would require 10% coverage of the whole-image box, raising the
            # smallest area from 8% to 10%.
            min_object_covered=0.0,
            area_range=CROP_AREA_RANGE,
            aspect_ratio_range=CROP_ASPECT_RANGE,
            max_attempts=_CROP_ATTEMPTS,
            use_image_if_no_bounding_boxes=True,
        )
        windows.append(tf.concat([begin[:2], extent[:2]], 0))
    return tf.stack(windows)


def sample_crop_windows(height: int, width: int, seed: int, count: int) -> np.ndarray:
    """`crop_windows` of records 0..count-1 of a height x width image: int32 [count, 2, 4]."""
    tf = import_tf()
    shape = tf.constant([height, width, 3], tf.int32)
    ds = tf.data.Dataset.range(count).map(lambda p: crop_windows(shape, seed, p))
    return next(ds.batch(count).as_numpy_iterator())


def _resize_uint8(image: Any, size: int) -> Any:
    """Resize float [h, w, 3] to uint8 [size, size, 3]: bilinear, after 2x box halvings if needed.

    Plain bilinear touches every source pixel only while it shrinks by at most 2x; beyond that it
    would skip pixels (aliasing), so each side is first halved by 2-pixel averages until it is
    within 2x of `size`. That antialiases like a wider filter at a small fraction of the cost of
    `antialias=True`, which took most of the host's time. Halvings are rare for ImageNet-sized
    images (a crop wider than 448 px) and make large images cheap.
    """
    tf = import_tf()

    for axis, window in ((0, [2, 1]), (1, [1, 2])):
        (image,) = tf.while_loop(
            lambda x, axis=axis: tf.shape(x)[axis] > 2 * size,
            lambda x, window=window: (tf.nn.avg_pool2d(x[None], window, window, "VALID")[0],),
            (image,),
            shape_invariants=(tf.TensorShape([None, None, 3]),),
        )
    resized = tf.image.resize(image, [size, size], method="bilinear")
    # Bilinear weights are non-negative and sum to 1: the result stays within [0, 255].
    return tf.cast(tf.round(resized), tf.uint8)


# libjpeg can decode at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients: the scaled inverse
# DCT is cheaper, acts as an antialiasing filter, and spares the float halvings of
# `_resize_uint8` on large images.
_DCT_RATIOS = (1, 2, 4, 8)


def _union_bounds(windows: Any) -> tuple[Any, Any]:
    """(begin, end) int32 [2] (y, x) of the box spanning `windows` (int32 [k, 4] y, x, h, w)."""
    tf = import_tf()
    begin = tf.reduce_min(windows[:, :2], axis=0)
    return begin, tf.reduce_max(windows[:, :2] + windows[:, 2:], axis=0)


def decode_jpeg_windows(
    data: Any, shape: Any, windows: Any, size: int, union_size: int = 0
) -> tuple[Any, Any]:
    """Decodes the union of `windows` (int32 [k, 4] y, x, h, w) of a JPEG of `shape`, DCT-scaled.

    Returns (uint8 [h, w, 3] union, windows in its pixels). The scale is the smallest 1/r that
    leaves every window at least `size` px on each side, so the resize that follows still only
    shrinks where it did at full scale; or, with `union_size`, that leaves the union at least
    `union_size` px on each side, if smaller (the union is resized to `union_size` next, so
    its windows lose nothing either). Scaled windows are rounded to whole pixels (at most r/2
    original pixels per edge).
    """
    tf = import_tf()
    shape = shape[:2]
    ratios = tf.constant(_DCT_RATIOS[1:], tf.int32)
    smallest = tf.reduce_min(windows[:, 2:])
    ratio_index = tf.reduce_sum(tf.cast(smallest >= size * ratios, tf.int32))
    if union_size:
        begin, end = _union_bounds(windows)
        extent = end - begin
        by_union = tf.reduce_sum(tf.cast(tf.reduce_min(extent) >= union_size * ratios, tf.int32))
        ratio_index = tf.maximum(ratio_index, by_union)

    def decode(ratio: int) -> Callable[[], tuple[Any, Any]]:
        def branch() -> tuple[Any, Any]:
            scaled_shape = -(-shape // ratio)  # libjpeg's output size: ceil(side / ratio)
            begin = (windows[:, :2] + ratio // 2) // ratio
            end = tf.minimum((windows[:, :2] + windows[:, 2:] + ratio // 2) // ratio, scaled_shape)
            union_begin = tf.reduce_min(begin, axis=0)
            mcu = max(1, _JPEG_MCU_WIDTH // ratio)  # see _JPEG_MCU_WIDTH
            union_begin = union_begin - tf.stack([0, union_begin[1] % mcu])
            union_end = tf.reduce_max(end, axis=0)
            union = tf.image.decode_and_crop_jpeg(
                data, tf.concat([union_begin, union_end - union_begin], 0), channels=3, ratio=ratio
            )
            local = tf.concat([begin - union_begin, end - begin], axis=1)
            return union, local

        return branch

    return tf.switch_case(ratio_index, [decode(r) for r in _DCT_RATIOS])


def _decode_union(
    data: Any, size: int, seed: int, position: Any, union_size: int = 0
) -> tuple[Any, Any]:
    """The union of a record's two crop windows, uint8 [h, w, 3], and the windows in its pixels.

    The image is decoded once: for JPEGs only the union (decoding is most of the cost, and
    decoding each window separately nearly doubles it), DCT-scaled where the windows (or, with
    `union_size`, the union) allow; other formats whole, then sliced.
    """
    tf = import_tf()

    def jpeg() -> tuple[Any, Any]:
        shape = tf.image.extract_jpeg_shape(data)
        windows = crop_windows(shape, seed, position)
        return decode_jpeg_windows(data, shape, windows, size, union_size)

    def other() -> tuple[Any, Any]:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        windows = crop_windows(tf.shape(image), seed, position)
        begin, end = _union_bounds(windows)
        local = tf.concat([windows[:, :2] - begin, windows[:, 2:]], axis=1)
        return image[begin[0] : end[0], begin[1] : end[1]], local

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def decode_views(data: Any, size: int, seed: int, position: Any) -> Any:
    """SimCLR's two random resized crops of an encoded image, uint8 [2, size, size, 3]."""
    tf = import_tf()
    image, windows = _decode_union(data, size, seed, position)
    views = []
    for view in range(_NUM_VIEWS):
        y, x, h, w = tf.unstack(windows[view])
        # Slice before the cast: copying uint8 moves a quarter of the bytes.
        views.append(_resize_uint8(tf.cast(image[y : y + h, x : x + w], tf.float32), size))
    return tf.stack(views)


def decode_union_resized(
    data: Any, size: int, host_size: int, seed: int, position: Any
) -> tuple[Any, Any]:
    """The crop windows' union as uint8 [host_size, host_size, 3] and the windows in it [2, 4].

    The windows are float32 (y, x, h, w) in the resized union's pixels: the device cuts the views
    out of it (`augment.views` with boxes). One resize per image instead of one per view keeps
    the host's cost close to a plain decode-and-crop. The union is stretched to a square, which
    the windows' coordinates undo.
    """
    tf = import_tf()
    image, windows = _decode_union(data, size, seed, position, union_size=host_size)
    scale = host_size / tf.cast(tf.shape(image)[:2], tf.float32)
    boxes = tf.cast(windows, tf.float32) * tf.tile(scale, [2])[None]
    return _resize_uint8(tf.cast(image, tf.float32), host_size), boxes


def decode_centre(data: Any, size: int, fraction: float) -> Any:
    """The centre square spanning `fraction` of the shorter side, uint8 [size, size, 3]."""
    tf = import_tf()

    def window(shape: Any) -> Any:
        side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * fraction, tf.int32)
        return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])

    def jpeg() -> Any:  # decodes only the window
        shape = tf.image.extract_jpeg_shape(data)
        image, local = decode_jpeg_windows(data, shape, window(shape)[None], size)
        y, x, h, w = tf.unstack(local[0])
        return image[y : y + h, x : x + w]

    def other() -> Any:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        y, x, h, w = tf.unstack(window(tf.shape(image)))
        return image[y : y + h, x : x + w]

    return _resize_uint8(tf.cast(tf.cond(tf.io.is_jpeg(data), jpeg, other), tf.float32), size)


@functools.lru_cache(maxsize=32)
def decoder(
    mode: str, size: int, *, host_size: int = 0, seed: int = 0, fraction: float = 1.0
) -> Callable[[Any, Any], dict[str, Any]]:
    """(encoded image, stream position) -> tensors {'image'[, 'crop']} of one decode mode.

    'centre': `decode_centre` (fraction); 'views': `decode_views`; 'union':
    `decode_union_resized` (host_size). Cached: the same arguments give the same function, so a
    pipeline reuses the graph another traced (`pipeline`).
    """
    if mode == "centre":
        return lambda data, position: {"image": decode_centre(data, size, fraction)}
    if mode == "views":
        return lambda data, position: {"image": decode_views(data, size, seed, position)}
    if mode == "union":

        def union(data: Any, position: Any) -> dict[str, Any]:
            image, boxes = decode_union_resized(data, size, host_size, seed, position)
            return {"image": image, "crop": boxes}

        return union
    raise ValueError(f"decoder mode={mode!r}; allowed: 'centre', 'views', 'union'.")
