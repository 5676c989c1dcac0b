"""SimCLR v2 selective-kernel ResNets: parameter counts, layout, ResNet-D pooling, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_config

from simclr_jax import config_base
from simclr_jax.models import ProjectionHead, ResNet, SimCLRModel, resnet
from simclr_jax.models.resnet import _avg_pool_d

# The SimCLR v2 README's table (google-research/simclr): depth, width, SK, Param (M).
SIMCLR_V2_TABLE = [
    (50, 1, False, 24),
    (50, 1, True, 35),
    (50, 2, False, 94),
    (50, 2, True, 140),
    (101, 1, False, 43),
    (101, 1, True, 65),
    (101, 2, False, 170),
    (101, 2, True, 257),
    (152, 1, False, 58),
    (152, 1, True, 89),
    (152, 2, False, 233),
    (152, 2, True, 354),
    (152, 3, True, 795),
]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth,width,sk,millions", SIMCLR_V2_TABLE)
def test_param_counts_match_the_simclr_v2_table(depth, width, sk, millions):
    # What the table counts: every variable of the encoder, i.e. the trainable parameters (conv
    # kernels, BN scale/bias) plus the BN moving mean/variance, as TF's `model.variables` does;
    # no projection head, no classifier (a 1000-class fc would add 2M to ResNet-50 1x). Without
    # the BN statistics ResNet-152 2x has 232.25M, which the table would round to 232, not 233.
    # jax.eval_shape: no compile, no memory.
    model = resnet(depth, width, sk_ratio=0.0625 if sk else 0.0)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    assert round(_count(shapes) / 1e6) == millions
    assert abs(_count(shapes["params"]) / 1e6 - millions) < 1.0  # trainable only: within 1M


def test_sk_bottleneck_layout():
    model = resnet(50, 1, base_width=8, sk_ratio=0.0625)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    p = v["params"]
    # ResNet-D stem: 3x3/2 at half width, 3x3, 3x3.
    assert p["stem_conv1"]["kernel"].shape == (3, 3, 3, 4)
    assert p["stem_conv2"]["kernel"].shape == (3, 3, 4, 4)
    assert p["stem_conv"]["kernel"].shape == (3, 3, 4, 8)
    sk = p["stage2_block1"]["sk_conv2"]
    # one conv makes both 3x3 streams; the mixing MLP is max(int(16 * 0.0625), 32) wide.
    assert sk["conv"]["kernel"].shape == (3, 3, 16, 32)
    assert sk["fc1"]["kernel"].shape == (1, 1, 16, 32)
    assert sk["fc2"]["kernel"].shape == (1, 1, 32, 32)
    assert "conv2" not in p["stage2_block1"]
    assert p["stage2_block1"]["downsample_conv"]["kernel"].shape == (1, 1, 32, 64)


def test_resnet_d_pools_match_the_official_semantics():
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 1)).astype(np.float32)
    # stride 2: zero row/column appended, every 2x2 window averaged over 4 cells.
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    want2 = padded.reshape(1, 3, 2, 3, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(_avg_pool_d(jnp.asarray(x), 2), want2, atol=1e-6)
    # stride 1 (TF 'SAME'): windows clipped at the bottom/right edge average the valid cells.
    want1 = np.zeros_like(x)
    for i in range(5):
        for j in range(5):
            want1[0, i, j, 0] = x[0, i : i + 2, j : j + 2, 0].mean()
    np.testing.assert_allclose(_avg_pool_d(jnp.asarray(x), 1), want1, atol=1e-6)


def test_stem_max_pool_follows_compat():
    x = jnp.arange(36.0).reshape(1, 6, 6, 1)
    # 'simclr_tf' (TF 'SAME'): windows start at 0, 2, 4 and pad (0, 1); torchvision's at -1, 1, 3.
    assert float(nn.max_pool(x, (3, 3), (2, 2), padding="SAME")[0, 0, 0, 0]) == 14.0
    assert float(nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])[0, 0, 0, 0]) == 7.0


def test_config_keys_are_validated():
    c = tiny_config()
    assert c.model.sk_ratio == 0.0 and c.model.compat == "torchvision"
    c.model.width_multiplier = 3
    c.model.sk_ratio = 0.0625
    config_base.validate_config(c)
    for key, bad in (("sk_ratio", -0.5), ("compat", "keras")):
        c2 = tiny_config()
        c2.model[key] = bad
        with pytest.raises(ValueError, match=f"model.{key}"):
            config_base.validate_config(c2)


def test_sk_model_loss_and_grads_sharded_equal_single_device():
    # A two-stage SK-ResNet (ResNet-D stem, SK convs, avg-pool shortcuts) in the SimCLR model,
    # trained with global BN on a batch sharded over the 8 devices vs one device.
    c = tiny_config()
    encoder = ResNet(stage_sizes=(1, 1), block="bottleneck", base_width=4, sk_ratio=0.0625)
    head = ProjectionHead(num_layers=3, hidden_dim=16, out_dim=8)
    model = SimCLRModel(encoder=encoder, head=head, num_classes=10)
    x = jax.random.uniform(jax.random.key(1), (16, 12, 12, 3))
    # Random variables from the shapes alone: an init would cost one more XLA compile.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:2], train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes
    )

    def loss_fn(params, batch):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch,
            train=True,
            mutable=["batch_stats"],
        )
        z = out["projection"]
        return jnp.mean((z[:8] - z[8:]) ** 2) + jnp.mean(z**2)

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss_1, grads_1 = step(variables["params"], x)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ps = jax.device_put(variables["params"], NamedSharding(mesh, P()))
    loss_8, grads_8 = step(ps, xs)
    assert c.model.sk_ratio == 0.0 and np.isfinite(float(loss_1))
    # fp32 reductions (global BN statistics and their backward) summed in another order over 8
    # shards: 1e-5 on the loss, 2e-4 of the largest gradient entry (measured: 2e-5); per-device
    # BN statistics would miss by more than 1e-2.
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
    sk_grad = grads_1["encoder"]["stage1_block1"]["sk_conv2"]["fc2"]["kernel"]
    assert float(jnp.max(jnp.abs(sk_grad))) > 0  # the mixing MLP is trained
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_1))
    for a, b in zip(jax.tree.leaves(grads_8), jax.tree.leaves(grads_1), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4 * scale)
