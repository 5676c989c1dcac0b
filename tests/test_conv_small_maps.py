"""The im2col + dot formulation of small-map convolutions equals lax.conv in value and gradient,
and `materialized` conv inputs change no bit of a block's values or gradients."""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from simclr_jax.runtime import cpu_conv
from tests.tolerances import assert_trees_close

resnet = importlib.import_module("simclr_jax.models.resnet")  # the package re-exports a function
# The model's conv with the runtime's CPU primitive, as runs on CPU build it (cpu_conv.for_backend).
CPU_CONV = functools.partial(resnet._conv, conv_general_dilated=cpu_conv.conv_general_dilated)

CASES = [  # (map side, Cin, Cout, kernel, stride): 2x2 outputs as in the digits default's stage 4
    (2, 8, 16, 3, 1),
    (4, 8, 16, 3, 2),
    (4, 8, 16, 1, 2),
    (3, 4, 8, 3, 2),  # odd map: pads reach past the edge
    (1, 4, 8, 3, 1),
]


def _reference(x, k, stride):
    pad = [(k.shape[0] // 2,) * 2, (k.shape[1] // 2,) * 2]
    return lax.conv_general_dilated(
        x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("side,cin,cout,ksize,stride", CASES)
def test_value_and_grad_equal_lax_conv(side, cin, cout, ksize, stride):
    x = jax.random.normal(jax.random.key(0), (6, side, side, cin))
    k = jax.random.normal(jax.random.key(1), (ksize, ksize, cin, cout)) / np.sqrt(cin * ksize**2)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    pad = [(ksize // 2,) * 2] * 2

    def loss(f):
        return lambda x, k: jnp.sum(jnp.sin(f(x, k)))

    def im2col(x, k):
        return cpu_conv.conv_general_dilated(x, k, (stride, stride), pad, dimension_numbers=dn)

    def ref(x, k):
        return _reference(x, k, stride)

    n = x.shape[0] * side * side * ksize * ksize * cin  # the longest sum (the kernel gradient)
    y, y_ref = jax.jit(im2col)(x, k), jax.jit(ref)(x, k)
    assert y.shape == y_ref.shape
    assert_trees_close(y, y_ref, reduction_len=n, depth=1)
    g = jax.jit(jax.grad(loss(im2col), argnums=(0, 1)))(x, k)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, k)
    assert_trees_close(g, g_ref, reduction_len=n, depth=2)
    jaxpr = str(jax.make_jaxpr(im2col)(x, k))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr


def _same_conv_jaxpr(x, k) -> str:
    """The jaxpr of `cpu_conv.conv_general_dilated` as a stride-1 'same' 3x3 NHWC conv of x by k."""
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(x, k):
        return cpu_conv.conv_general_dilated(x, k, (1, 1), [(1, 1)] * 2, dimension_numbers=dn)

    return str(jax.make_jaxpr(conv)(x, k))


def test_large_maps_keep_lax_conv():
    jaxpr = _same_conv_jaxpr(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)))
    assert "conv_general_dilated" in jaxpr


def test_block_params_and_grads_unchanged(monkeypatch):
    """A strided basic block onto 2x2 maps (as the digits default's stage 4) with and without."""
    import functools

    norm = functools.partial(nn.BatchNorm, use_running_average=False)
    block = resnet.BasicBlock(filters=16, strides=2, conv=CPU_CONV, norm=norm)
    x = jax.random.normal(jax.random.key(2), (8, 4, 4, 8))

    def init_and_grads():
        variables = block.init(jax.random.key(0), x)

        def loss(params):
            y, _ = block.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))

        return variables, jax.jit(jax.value_and_grad(loss))(variables["params"])

    monkeypatch.setattr(cpu_conv, "IM2COL_MAX_PIXELS", 0)
    ref_vars, ref = init_and_grads()
    monkeypatch.setattr(cpu_conv, "IM2COL_MAX_PIXELS", 4)
    variables, got = init_and_grads()
    # Same param names, shapes and init: checkpoints, exports and official imports are unaffected.
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref_vars)
    assert_trees_close(variables, ref_vars, reduction_len=1, depth=1)
    n = 8 * 2 * 2 * 9 * 16  # the longest sum: a kernel gradient
    assert_trees_close(got, ref, reduction_len=n, depth=3 * 3 * 2)


def test_materialized_inputs_change_no_bit(monkeypatch):
    """A stride-1 and a strided basic block on 8x8 maps (lax.conv on materialized inputs, as on
    one CPU device): the values and gradients equal those without `materialized` exactly, and
    the conditional that keeps XLA:CPU from fusing the input into its relayout copy is there."""
    import functools

    norm = functools.partial(nn.BatchNorm, use_running_average=False)
    x = jax.random.normal(jax.random.key(3), (8, 8, 8, 8))

    def loss_and_grads(block):
        variables = block.init(jax.random.key(0), x)

        def loss(params, x):
            y, _ = block.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return f(variables["params"], x), f.lower(variables["params"], x).as_text()

    monkeypatch.setattr(cpu_conv, "single_cpu_device", lambda: True)  # the tests run 8 devices
    for strides, filters in ((1, 8), (2, 16)):
        block = resnet.BasicBlock(filters=filters, strides=strides, conv=CPU_CONV, norm=norm)
        got, hlo = loss_and_grads(block)
        with monkeypatch.context() as m:
            m.setattr(cpu_conv, "materialized", lambda v, kernel: v)
            ref, ref_hlo = loss_and_grads(block)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert "stablehlo.case" in hlo or "stablehlo.if" in hlo
        assert "stablehlo.case" not in ref_hlo and "stablehlo.if" not in ref_hlo
    # The image (3 channels, the stem's input) is left as it is.
    jaxpr = _same_conv_jaxpr(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 8)))
    assert "cond" not in jaxpr and "conv_general_dilated" in jaxpr


def test_kernel_grad_chunks_follow_the_input_size(monkeypatch):
    """One range (lax.conv's own gradient) on several devices, in bf16 and under the limit; on
    one CPU device the digits default's 16x16x16 stage splits into 8 chunks of 64 images."""
    stage1 = jax.ShapeDtypeStruct((512, 16, 16, 16), jnp.float32)
    assert cpu_conv.kernel_grad_chunks(stage1) == [(0, 512)]  # the tests run 8 devices
    monkeypatch.setattr(cpu_conv, "single_cpu_device", lambda: True)
    assert cpu_conv.kernel_grad_chunks(stage1) == [(64 * i, 64 * (i + 1)) for i in range(8)]
    assert cpu_conv.kernel_grad_chunks(stage1.update(dtype=jnp.bfloat16)) == [(0, 512)]
    assert cpu_conv.kernel_grad_chunks(jax.ShapeDtypeStruct((512, 4, 4, 64), jnp.float32)) == [
        (0, 256),
        (256, 512),
    ]
    assert cpu_conv.kernel_grad_chunks(jax.ShapeDtypeStruct((64, 8, 8, 4), jnp.float32)) == [
        (0, 64)
    ]


def test_chunked_kernel_grad_equals_lax_conv(monkeypatch):
    """Kernel gradients summed over uneven batch chunks: values and input gradients bit-equal to
    lax.conv's, the kernel gradient equal to a float64 sum to fp32 rounding, as lax.conv's is."""
    monkeypatch.setattr(cpu_conv, "single_cpu_device", lambda: True)
    monkeypatch.setattr(cpu_conv, "KERNEL_GRAD_CHUNK_ELEMENTS", 1500)
    x = jax.random.normal(jax.random.key(4), (8, 8, 8, 8)) + 0.5
    k = jax.random.normal(jax.random.key(5), (3, 3, 8, 16)) / np.sqrt(9 * 8)
    g = jax.random.normal(jax.random.key(6), (8, 8, 8, 16))
    assert cpu_conv.kernel_grad_chunks(x) == [(0, 2), (2, 5), (5, 8)]
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def value_and_grads(conv):
        y, vjp = jax.vjp(lambda x, k: conv(x, k, (1, 1), [(1, 1)] * 2, dimension_numbers=dn), x, k)
        return (y, *vjp(g))

    y, dx, dk = jax.jit(lambda: value_and_grads(cpu_conv.conv_general_dilated))()
    y_ref, dx_ref, dk_ref = jax.jit(lambda: value_and_grads(lax.conv_general_dilated))()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
    assert not np.array_equal(np.asarray(dk), np.asarray(dk_ref))  # the chunks did run
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    g64 = np.asarray(g, np.float64)
    dk64 = np.stack(
        [
            np.stack(
                [np.einsum("nhwc,nhwd->cd", xp[:, i : i + 8, j : j + 8], g64) for j in range(3)]
            )
            for i in range(3)
        ]
    )
    n = 8 * 8 * 8  # each kernel-gradient element sums over the batch and the map
    assert_trees_close(dk, dk64, reduction_len=n, depth=1)
    assert_trees_close(dk_ref, dk64, reduction_len=n, depth=1)
    hlo = jax.jit(lambda: value_and_grads(cpu_conv.conv_general_dilated)).lower().as_text()
    assert hlo.count("stablehlo.convolution") == 1 + 1 + 3  # value, input gradient, 3 chunks


def test_the_runtime_chooses_the_cpu_conv_only_on_the_cpu_backend(monkeypatch):
    """The model definition holds no CPU workaround: a run passes its backend's primitive."""
    from simclr_jax import config_base, models

    model = config_base.base_config().model
    assert models.create_encoder(model).conv_general_dilated is None  # plain nn.Conv
    assert cpu_conv.for_backend() is cpu_conv.conv_general_dilated  # the tests run on CPU
    enc = models.create_encoder(model, conv=cpu_conv.for_backend())
    assert enc.conv_general_dilated is cpu_conv.conv_general_dilated
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert cpu_conv.for_backend() is None
