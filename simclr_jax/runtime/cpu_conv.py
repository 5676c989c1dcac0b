"""Convolutions for `nn.Conv` that XLA:CPU runs faster: the same sums as `lax.conv`.

Three formulations, each measured on the digits default's train step (docs/benchmarks_history.md):
an explicit im2col + one dot on maps of at most `IM2COL_MAX_PIXELS` pixels; on one CPU device, conv
inputs `materialized` into buffers of their own; and there, kernel gradients summed over batch
chunks of at most `KERNEL_GRAD_CHUNK_ELEMENTS` input elements. Params are `nn.Conv`'s, so
checkpoints, exports and the official imports are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Convolutions whose output map has at most this many pixels run as an explicit im2col (the
# kernel-offset slices of the padded input side by side on the channel axis) and one matmul with
# the kernel reshaped to [kh * kw * Cin, Cout]. XLA:CPU runs a 3x3 conv onto 2x2 maps about 10x
# slower than this matmul (docs/benchmarks_history.md); on 4x4 maps and larger its own conv is
# faster.
# The sum is the same (only its rounding order differs).
IM2COL_MAX_PIXELS = 4
# On one CPU device a larger conv's kernel gradient is summed over batch chunks of at most this
# many input elements (1 MiB of fp32). XLA:CPU packs the image patches of the whole batch into
# one contraction; on chunks this size the same work runs about twice as fast (a 3x3 conv on the
# digits default's [512, 16, 16, 16] maps: 11.5 -> 5.3 ms; docs/benchmarks_history.md), and a
# pairwise sum of the chunks' gradients is closer to float64 than the one long sum.
KERNEL_GRAD_CHUNK_ELEMENTS = 2**18
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def single_cpu_device() -> bool:
    """True when JAX runs on one CPU device (where `materialized` and the chunks apply)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def materialized(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`x` computed into a buffer of its own on one CPU device (else unchanged): a conv input.

    For a conv's kernel gradient XLA:CPU copies the input into a [C, H, W, N] layout, and it fuses
    the whole elementwise chain that made the input (BatchNorm, ReLU and residual adds back to the
    stage's first conv) into that copy, recomputing it with strided reads: 13-26 ms per copy on the
    digits default (docs/benchmarks_history.md). A conditional's result is always a buffer, so the
    copy reads it once. `lax.optimization_barrier` would say this directly, but XLA:CPU drops
    barriers before fusion. Both branches give `x` (the second only runs if the kernel holds a NaN),
    so values and gradients stay the same bit for bit. Only on a single CPU device, where that was
    measured (the digits default): programs sharded over several devices (the tests' 8 virtual ones,
    multi-host CPU runs) compile exactly as before.
    """
    if not single_cpu_device():
        return x
    first = kernel.reshape(-1)[0]
    return lax.cond(first == first, lambda v: v, lambda v: v + 0, x)


def kernel_grad_chunks(x: jnp.ndarray) -> list[tuple[int, int]]:
    """The batch ranges whose kernel gradients `conv_general_dilated` sums for input `x`.

    One range (the whole batch: `lax.conv`'s own gradient) unless on one CPU device with an fp32
    input of more than `KERNEL_GRAD_CHUNK_ELEMENTS` elements (bf16 partial sums would round).
    """
    if not single_cpu_device() or x.dtype != jnp.float32:
        return [(0, x.shape[0])]
    return batch_ranges(x.shape[0], -(-x.size // KERNEL_GRAD_CHUNK_ELEMENTS))


def batch_ranges(n: int, count: int) -> list[tuple[int, int]]:
    """`min(count, n)` contiguous ranges splitting `range(n)` as evenly as can be (at least one)."""
    count = max(1, min(count, n))
    edges = [n * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _pairwise_sum(parts: list[jnp.ndarray]) -> jnp.ndarray:
    """Sum of `parts` as a balanced tree of adds."""
    while len(parts) > 1:
        pairs = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
        parts = pairs + parts[len(pairs) * 2 :]
    return parts[0]


def chunked_kernel_grad(conv: Callable, chunks: list[tuple[int, int]]) -> Callable:
    """`conv(x, kernel)` whose kernel gradient is the pairwise sum over the batch `chunks`."""

    @jax.custom_vjp
    def f(x, kernel):
        return conv(x, kernel)

    def fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def bwd(res, g):
        x, kernel = res
        dx = jax.vjp(lambda v: conv(v, kernel), x)[1](g)[0]

        def kernel_grad(a: int, b: int) -> jnp.ndarray:
            return jax.vjp(lambda k: conv(x[a:b], k), kernel)[1](g[a:b])[0]

        return dx, _pairwise_sum([kernel_grad(a, b) for a, b in chunks])

    f.defvjp(fwd, bwd)
    return f


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """`lax.conv_general_dilated` for `nn.Conv`: im2col + dot on small output maps.

    Falls back to `lax.conv_general_dilated` for maps above `IM2COL_MAX_PIXELS`, dilations,
    feature groups, string paddings and layouts other than NHWC/HWIO; on one CPU device the
    fallback's inputs of more than 3 channels are `materialized` and its kernel gradient is
    summed over `kernel_grad_chunks`.
    """

    def conv(x, kernel):
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )

    plain = all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if (
        kwargs
        or not plain
        or feature_group_count != 1
        or isinstance(padding, str)
        or lhs.ndim != 4
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC
    ):
        return conv(lhs, rhs)
    (kh, kw, cin, cout), (sh, sw) = rhs.shape, tuple(window_strides)
    (ph0, ph1), (pw0, pw1) = (tuple(p) for p in padding)
    b, h, w, _ = lhs.shape
    ho, wo = (h + ph0 + ph1 - kh) // sh + 1, (w + pw0 + pw1 - kw) // sw + 1
    if ho * wo > IM2COL_MAX_PIXELS or ho < 1 or wo < 1:
        if cin <= 3:
            # The image (the stem's input): it has no such chain, and materialising it changes
            # the rounding of the stem's kernel gradient (2.5e-7 relative on the digits default).
            return conv(lhs, rhs)
        x = materialized(lhs, rhs)
        chunks = kernel_grad_chunks(x)
        return conv(x, rhs) if len(chunks) == 1 else chunked_kernel_grad(conv, chunks)(x, rhs)
    x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (ph0, ph1, 0), (pw0, pw1, 0), (0, 0, 0)))
    cols = [
        lax.slice(
            x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    y = lax.dot_general(
        patches.reshape(b * ho * wo, kh * kw * cin),
        rhs.reshape(kh * kw * cin, cout),
        (((1,), (0,)), ((), ())),
        precision=precision,
    )
    return y.reshape(b, ho, wo, cout)


def for_backend() -> Callable | None:
    """The conv primitive a run's model should use: this module's on CPU, None elsewhere.

    Every formulation here was measured on XLA:CPU only; on GPU and TPU the model keeps
    `lax.conv_general_dilated` (None), which their compilers already lower well.
    """
    return conv_general_dilated if jax.default_backend() == "cpu" else None
