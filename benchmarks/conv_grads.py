"""Forward, input-gradient and kernel-gradient ms of the digits default's convolutions, one by one.

    python benchmarks/conv_grads.py                        # lax.conv per pass, batch 512
    python benchmarks/conv_grads.py --chunks=1,4,8,16,32   # kernel gradient over batch chunks

Each row is one 3x3 conv of the digits default's ResNet-18 (CIFAR stem, base width 16, 512 views
of 16 px): `jax.vjp` of `lax.conv_general_dilated`, jitted alone, best of 3 rounds of 20 calls,
with `platform_flags.set_cpu_flags()` as `simclr_jax.main` runs it. With --chunks the kernel
gradient is also timed summed over that many batch chunks (`cpu_conv`'s formulation on one CPU
device), with its largest error against a float64 sum relative to the largest element.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (map side, Cin, Cout, stride): the stem's successors in stages 1-3 (stage 4 runs as im2col)
CONVS = [(16, 16, 16, 1), (16, 16, 32, 2), (8, 32, 32, 1), (8, 32, 64, 2), (4, 64, 64, 1)]


def best_ms(f, *args, calls: int = 20, rounds: int = 3) -> float:
    """Best per-call ms over `rounds` rounds of `calls` calls of the jitted `f`."""
    import jax

    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def float64_kernel_grad(x, g, stride: int):
    """The 3x3, pad-1 conv's kernel gradient summed in float64 (numpy)."""
    import numpy as np

    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    so, g64 = g.shape[1], g.astype(np.float64)
    taps = [
        [
            np.einsum(
                "nhwc,nhwd->cd",
                xp[:, i : i + stride * so : stride, j : j + stride * so : stride],
                g64,
            )
            for j in range(3)
        ]
        for i in range(3)
    ]
    return np.array(taps)


def conv_row(
    side: int,
    cin: int,
    cout: int,
    stride: int,
    batch: int,
    chunk_counts: list[int],
    calls: int = 20,
    rounds: int = 3,
) -> list[str]:
    """The table cells of one conv: its three passes' ms, then the chunked kernel gradients'."""
    import jax
    import numpy as np
    from jax import lax

    from simclr_jax.runtime import cpu_conv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
    w = (rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g = rng.normal(size=(batch, side // stride, side // stride, cout)).astype(np.float32)

    def conv(x, w):
        pad = ((1, 1), (1, 1))
        dn = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=dn)

    def input_grad(w, g):
        return jax.vjp(lambda v: conv(v, w), x)[1](g)[0]

    def kernel_grad(x, g, chunks=1):
        if chunks == 1:
            return jax.vjp(lambda k: conv(x, k), w)[1](g)[0]
        chunked = cpu_conv.chunked_kernel_grad(conv, cpu_conv.batch_ranges(batch, chunks))
        return jax.vjp(lambda k: chunked(x, k), w)[1](g)[0]

    timing = {"calls": calls, "rounds": rounds}
    cells = [
        f"3x3 s{stride}, {side}x{side}, {cin} -> {cout}",
        f"{best_ms(conv, x, w, **timing):.2f}",
        f"{best_ms(input_grad, w, g, **timing):.2f}",
        f"{best_ms(kernel_grad, x, g, **timing):.2f}",
    ]
    ref = float64_kernel_grad(x, g, stride) if chunk_counts else None
    for c in chunk_counts:
        chunked = functools.partial(kernel_grad, chunks=c)
        ms = best_ms(chunked, x, g, **timing)
        err = np.max(np.abs(np.asarray(jax.jit(chunked)(x, g), np.float64) - ref))
        cells.append(f"{ms:.2f} ({err / np.max(np.abs(ref)):.1e})")
    return cells


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--chunks", default="", help="comma-separated chunk counts for the kernel grad")
    p.add_argument("--calls", type=int, default=20, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (the best is shown)")
    p.add_argument("--convs", type=int, default=len(CONVS), help="time the first N convs only")
    return p


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Parses flags, times each conv, prints a Markdown table; returns its rows."""
    args = parser().parse_args(argv)
    from simclr_jax.runtime import platform_flags

    platform_flags.set_cpu_flags()
    chunk_counts = [int(c) for c in args.chunks.split(",") if c]
    head = ["conv", "forward ms", "input grad ms", "kernel grad ms"]
    head += [f"kernel grad, {c} chunks ms (error)" for c in chunk_counts]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for side, cin, cout, stride in CONVS[: args.convs]:
        timing = {"calls": args.calls, "rounds": args.rounds}
        cells = conv_row(side, cin, cout, stride, args.batch, chunk_counts, **timing)
        print("| " + " | ".join(cells) + " |", flush=True)
        rows.append(cells)
    return rows


if __name__ == "__main__":
    main()
