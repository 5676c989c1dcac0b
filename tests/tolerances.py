"""Tolerances for float32 results, derived from the arithmetic instead of from one CPU's rounding.

Two float32 evaluations of the same computation (8 devices vs 1, blockwise vs dense, XLA vs numpy)
differ only in the order in which their sums are rounded; which order, and whether fused
multiply-adds or wider vector registers (AVX2 vs AVX-512) are used, depends on the CPU and the
XLA version. So a tolerance fitted to the rounding seen on one machine fails on another. The
bounds here follow from the size of the numbers and the length of the sums instead:

- a sum of `n` float32 terms of magnitude up to `S` carries a rounding error of about
  `eps * sqrt(n) * S` (n roundings of relative size <= eps/2 each, which add like a random walk;
  the worst case `eps * n * S` needs every rounding to go the same way, which two summation
  orders of the same terms do not do), where `eps` = 2**-23 = 1.19e-7;
- a computation that stacks `depth` such reductions passes each one's error on with gain about 1
  (BatchNorm and the LARS trust ratio keep activations and updates at unit scale), so the errors
  add up: `eps * sqrt(n) * depth * S`. A convolution or dense layer followed by BatchNorm is 3
  stacked reductions (the layer's sum, the batch mean, the batch variance); the backward pass
  counts them again;
- the error of an element is relative to the size of the terms that were summed, not to the
  element itself (a small element of a gradient is a sum that cancelled), so an absolute
  tolerance scaled by the largest magnitude of the reference is used, not an elementwise `rtol`.

Use `n` = the longest reduction in the computation and `depth` = the number of stacked
reductions (for a ResNet-18: 17 conv + BN layers, 51 reductions). A real bug (per-device instead
of global statistics, a missing all-reduce, a wrong normaliser) changes results by percent,
orders of magnitude above these bounds.
"""

import math

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, the spacing of float32 numbers in [1, 2)


def fp32_rtol(reduction_len: int, depth: int = 1) -> float:
    """Relative error of a float32 result after `depth` stacked sums of `reduction_len` terms.

    `eps * sqrt(reduction_len) * depth`, relative to the magnitude of the summed terms (for a
    scalar that does not cancel, such as a loss or a norm, its own magnitude).
    """
    return EPS32 * math.sqrt(reduction_len) * depth


def fp32_atol(reference, reduction_len: int, depth: int = 1) -> float:
    """Absolute tolerance for the elements of `reference`: `fp32_rtol` x max |reference|."""
    scale = float(np.max(np.abs(np.asarray(reference, np.float64)))) if np.size(reference) else 0.0
    return fp32_rtol(reduction_len, depth) * scale


def assert_trees_close(actual, desired, *, reduction_len: int, depth: int, before=None):
    """Float leaves of two pytrees agree to the float32 rounding of the computation; others equal.

    With `before` (the trees' common input, e.g. the state before a train step) the scale of a
    leaf is its change, max |desired - before|: `new = before + change` carries the change's
    rounding error plus one rounding of the stored sum, at most 1 ulp <= eps x |new| per element
    (allowed twice, once for each side). Without `before` the scale is max |desired|.
    """
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_d = jax.tree.leaves(desired)
    flat_b = jax.tree.leaves(before) if before is not None else [None] * len(flat_d)
    assert len(flat_a) == len(flat_d) == len(flat_b), "the trees differ in structure"
    for (path, a), d, b in zip(flat_a, flat_d, flat_b, strict=True):
        a, d = np.asarray(a), np.asarray(d)
        name = jax.tree_util.keystr(path)
        if not np.issubdtype(d.dtype, np.floating):
            np.testing.assert_array_equal(a, d, err_msg=name)
            continue
        change = d if b is None else d.astype(np.float64) - np.asarray(b, np.float64)
        np.testing.assert_allclose(
            a,
            d,
            rtol=0.0 if b is None else 2 * EPS32,
            atol=fp32_atol(change, reduction_len, depth),
            err_msg=name,
        )
