"""How much detail the views keep when the host sends the crop windows' union at `host_size`.

    python benchmarks/host_size_resolution.py --host_size=224 --host_size=256 --host_size=288

With `config.data.host_size = H` the host resizes the union of an image's two crop windows to
H x H and the device cuts each view out of it, so a window of w px in a union of u px reaches the
device as w * min(1, H / u) px. With `host_size = 0` it keeps min(w, S) px (S = the view side;
more than S is resized away anyway). Per view, this prints the ratio of the two (the geometric
mean over height and width): 1.0 means the union path loses nothing. Windows are the pipeline's
own (`data.sample_crop_windows`); no image is decoded.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def detail_kept(windows: np.ndarray, host_size: int, size: int) -> np.ndarray:
    """Per view, the linear detail kept at `host_size` relative to host_size=0: float [n * 2]."""
    windows = windows.astype(np.float64)
    begin = windows[..., :2].min(axis=1)
    union = (windows[..., :2] + windows[..., 2:]).max(axis=1) - begin  # [n, 2] (h, w)
    extent = windows[..., 2:]  # [n, 2 views, 2]
    kept = np.minimum(extent * np.minimum(1.0, host_size / union[:, None]), size)
    return np.sqrt((kept / np.minimum(extent, size)).prod(axis=-1)).ravel()


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host_size", type=int, action="append")
    p.add_argument("--size", type=int, default=224, help="view side S")
    p.add_argument("--shape", action="append", help="HEIGHTxWIDTH (default 375x500, 500x375)")
    p.add_argument("--samples", type=int, default=4000, help="images per shape")
    return p


def main(argv: list[str] | None = None) -> list[tuple[int, int, int, float]]:
    """Prints the table for each image shape and host size; returns (h, w, H, mean) per row."""
    from simclr_jax import data

    args = parser().parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shape or ["375x500", "500x375"]]
    print("| image (h x w) | host_size | mean | 10th percentile | views under 0.75 |")
    print("|---|---|---|---|---|")
    rows = []
    for height, width in shapes:
        windows = data.sample_crop_windows(height, width, 0, args.samples)
        for host_size in args.host_size or [224, 256, 288, 320]:
            kept = detail_kept(windows, host_size, args.size)
            print(
                f"| {height} x {width} | {host_size} | {kept.mean():.2f} | "
                f"{np.percentile(kept, 10):.2f} | {np.mean(kept < 0.75):.1%} |"
            )
            rows.append((height, width, host_size, float(kept.mean())))
    return rows


if __name__ == "__main__":
    main()
