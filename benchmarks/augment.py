"""On-device SimCLR augmentation throughput (views/sec) for given image sizes.

    python benchmarks/augment.py --image_size=32 --image_size=224 --batch_size=256
    python benchmarks/augment.py --image_size=224 --host_size=256 --batch_size=64

Times `jax.jit(augment.views)` (two views per image, uint8 in, float out) on random images
already on the device, excluding compile time; prints one table row per size. Sizes <= 64 px use
the CIFAR settings (jitter 0.5, no blur), larger ones the ImageNet settings (blur p=0.5). With
`--host_size=H` the input is H x H window unions plus crop boxes, as `config.data.host_size`
feeds them (the views are cut at the boxes instead of at random crops).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# train_step.py, next to this file, also when this module is imported rather than run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run(image_size: int, batch_size: int, steps: int, host_size: int = 0) -> dict:
    """Compiles and times the two-view augmentation of one batch; returns the table row."""
    import jax
    import numpy as np

    from simclr_jax import augment
    from simclr_jax.runtime import parallel

    cfg = augment.default_augment_config(image_size)
    if image_size <= 64:
        cfg.color_jitter_strength, cfg.blur_prob = 0.5, 0.0
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    side = host_size or image_size
    images = rng.integers(0, 256, (batch_size, side, side, 3), dtype=np.uint8)
    images = jax.device_put(images, parallel.data_sharded(mesh))
    boxes = None
    if host_size:
        from train_step import random_boxes

        boxes = jax.device_put(random_boxes(rng, batch_size, side), parallel.data_sharded(mesh))
    fn = jax.jit(lambda k, x, b: augment.views(k, x, cfg, num_views=2, boxes=b))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(key, images, boxes))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        out = fn(jax.random.fold_in(key, i), images, boxes)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / steps
    dev = jax.devices()[0]
    return {
        "device": f"{jax.device_count()}x {dev.device_kind}",
        "px": image_size,
        "input": f"{host_size} px + boxes" if host_size else f"{image_size} px",
        "batch": batch_size,
        "blur": cfg.blur_prob,
        "ms_per_batch": dt * 1e3,
        "views_per_s": 2 * batch_size / dt,
        "compile_s": compile_s,
    }


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_size", type=int, action="append")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--host_size", type=int, default=0, help="H x H unions plus crop boxes")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Parses flags, runs each size, prints the table; returns its rows."""
    args = parser().parse_args(argv)
    from train_step import print_table

    sizes = args.image_size or [32, 224]
    rows = [run(s, args.batch_size, args.steps, args.host_size) for s in sizes]
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
