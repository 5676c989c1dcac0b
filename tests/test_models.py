"""ResNet encoders, heads, and global BatchNorm under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import init
from tolerances import fp32_atol

from simclr_jax import config_base
from simclr_jax.models import create_model, feature_dim, resnet


def _param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152, 200])
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_output_shapes_every_depth(depth, stem):
    model = resnet(depth, stem=stem, base_width=4)
    x = jnp.zeros((2, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, feature_dim(depth, base_width=4))


def test_small_resnet_runs_and_width_multiplier_scales_channels():
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    for width in (1, 2, 4):
        model = resnet(18, width_multiplier=width, stem="cifar", base_width=4)
        variables = init(model, jax.random.key(0), x, train=False)
        out = jax.jit(lambda v, m=model: m.apply(v, x, train=False))(variables)
        assert out.shape == (2, 32 * width)
        assert bool(jnp.all(jnp.isfinite(out)))


def test_resnet50_parameter_count():
    variables = jax.eval_shape(
        lambda: resnet(50).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    # torchvision's resnet50 has 25,557,032 params, of which fc holds 2,049,000.
    assert _param_count(variables["params"]) == 25_557_032 - 2_049_000
    assert feature_dim(50) == 2048


def test_resnet18_cifar_stem_has_no_pool():
    model = resnet(18, stem="cifar", base_width=8)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 8)
    # ImageNet stem: 7x7 stride 2 + pool gives a 4x smaller map at the first stage.
    imagenet = resnet(18, stem="imagenet", base_width=8)
    v2 = jax.eval_shape(
        lambda: imagenet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert v2["params"]["stem_conv"]["kernel"].shape == (7, 7, 3, 8)


def test_zero_init_last_bn():
    model = resnet(18, stem="cifar", base_width=4, zero_init_last_bn=True)
    params = init(model, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    assert float(jnp.abs(params["stage1_block1"]["bn2"]["scale"]).sum()) == 0.0
    assert float(params["stage1_block1"]["bn1"]["scale"].sum()) == 4.0


def test_bad_model_arguments_raise():
    with pytest.raises(ValueError, match="depth=19"):
        resnet(19)
    with pytest.raises(ValueError, match="stem='tiny'"):
        resnet(18, stem="tiny")
    with pytest.raises(ValueError, match="width_multiplier=0"):
        resnet(18, width_multiplier=0)


def _tiny_config(head_layers=2):
    c = config_base.base_config()
    c.model.depth, c.model.stem, c.model.base_width = 18, "cifar", 4
    c.model.head_layers, c.model.head_hidden_dim, c.model.head_out_dim = head_layers, 16, 8
    return c


@pytest.mark.parametrize("head_layers", [2, 3])
def test_simclr_model_outputs(head_layers):
    model = create_model(_tiny_config(head_layers), num_classes=10)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(1), x, train=False))
    out, _ = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables
    )
    assert out["features"].shape == (4, 32)
    assert out["projection"].shape == (4, 8)
    assert out["logits"].shape == (4, 10)
    assert len(out["head_outputs"]) == head_layers + 1
    assert [h.shape[-1] for h in out["head_outputs"]] == [32] + [16] * (head_layers - 1) + [8]
    # The final head BN has no shift (SimCLR v2).
    assert "bias" not in variables["params"]["head"][f"bn{head_layers}"]


def test_linear_head_gets_no_gradient_into_encoder():
    model = create_model(_tiny_config(), num_classes=3)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = init(model, jax.random.key(1), x, train=False)

    def logits_loss(params):
        out = model.apply({**variables, "params": params}, x, train=False)
        return jnp.sum(out["logits"] ** 2)

    grads = jax.jit(jax.grad(logits_loss))(variables["params"])
    enc_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
    head_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["linear_head"]))
    assert enc_norm == 0.0 and head_norm > 0.0


def test_batchnorm_statistics_are_global_under_a_mesh():
    mesh = jax.make_mesh((8,), ("data",))
    model = resnet(18, stem="cifar", base_width=4)
    # Each device's share of the batch has different statistics (an offset per shard).
    offsets = 0.25 * jnp.repeat(jnp.arange(8.0), 2)[:, None, None, None]
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3)) + offsets
    variables = init(model, jax.random.key(1), x[:2], train=False)

    def forward(v, images):
        return model.apply(v, images, train=True, mutable=["batch_stats"])

    out_1, stats_1 = jax.jit(forward)(variables, x)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    out_8, stats_8 = jax.jit(forward)(vs, xs)
    # Tolerance: fp32 reductions summed in a different order across 8 shards; the longest sum is
    # a BN statistic over 16 x 8 x 8 positions, stacked 17 conv + BN layers (stem + 16 block convs)
    # of 3 reductions deep, relative to the largest value (tests/tolerances.py). Per-device
    # statistics miss by > 1e-2.
    n, depth = 16 * 8 * 8, 3 * 17
    np.testing.assert_allclose(out_8, out_1, atol=fp32_atol(out_1, n, depth))
    for a, b in zip(jax.tree.leaves(stats_8), jax.tree.leaves(stats_1), strict=True):
        np.testing.assert_allclose(a, b, atol=fp32_atol(b, n, depth))
    # Per-device statistics would differ: normalising one shard alone gives other outputs.
    local = forward(variables, x[:2])[0]
    assert float(jnp.max(jnp.abs(local - out_1[:2]))) > 1e-2
