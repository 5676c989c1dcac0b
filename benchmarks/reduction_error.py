"""Rounding error of BatchNorm's batch sums under the XLA flags of this process, against float64.

    python benchmarks/reduction_error.py
    SIMCLR_NO_CPU_FLAGS=1 XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot \\
        python benchmarks/reduction_error.py

BatchNorm's statistics in training are sums over (batch, height, width) of every channel: of x
for the mean and of x * x for the variance. XLA:CPU sums them as a tree of reduce-windows;
`--xla_cpu_experimental_ynn_fusion_type=...,reduce` hands them to YNNPACK. The shapes are the
digits default's (512 views, 16 px, base width 16: [512, 16 / 2^i, 16 / 2^i, 16 x 2^i]) plus the
stem's 3-channel input; x ~ N(0.7, 2). Prints `shape | sum error | sum of squares error`: the
largest over channels of |fp32 - float64| / sum |x| (resp. / sum x^2), so that eps = 6e-8 is one
rounding of the result and a pairwise sum's bound is log2(n) eps.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(512, 16, 16, 16), (512, 8, 8, 32), (512, 4, 4, 64), (512, 2, 2, 128), (512, 16, 16, 3)]


def relative_errors(shape: tuple[int, ...], seed: int = 0) -> tuple[float, float]:
    """Returns the largest per-channel relative error of the fp32 sum and sum of squares."""
    import jax
    import jax.numpy as jnp

    x = (np.random.default_rng(seed).standard_normal(shape) * 2 + 0.7).astype(np.float32)
    sums = jax.jit(lambda v: (jnp.sum(v, (0, 1, 2)), jnp.sum(v * v, (0, 1, 2))))
    s, s2 = (np.asarray(a, np.float64) for a in sums(x))
    x64 = x.astype(np.float64)
    err = np.max(np.abs(s - x64.sum((0, 1, 2))) / np.abs(x64).sum((0, 1, 2)))
    ref2 = (x64 * x64).sum((0, 1, 2))
    return float(err), float(np.max(np.abs(s2 - ref2) / ref2))


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512, help="views: the shapes' leading dimension")
    return p


def main(argv: list[str] | None = None) -> list[tuple[tuple[int, ...], float, float]]:
    """Sets the CPU flags as simclr_jax.main does, then prints the table; returns its rows."""
    args = parser().parse_args(argv)
    from simclr_jax.runtime import platform_flags

    platform_flags.set_cpu_flags()
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| shape | sum error | sum of squares error |\n|---|---|---|")
    rows = []
    for shape in SHAPES:
        shape = (args.batch, *shape[1:])
        e1, e2 = relative_errors(shape)
        print(f"| {list(shape)} | {e1:.1e} | {e2:.1e} |", flush=True)
        rows.append((shape, e1, e2))
    return rows


if __name__ == "__main__":
    main()
