"""A TensorFlow stand-in for google-research/simclr's models, for the import tests.

Written for these tests (the official code is not shipped): the same module tree, attribute names
and creation order as the official `tf2/resnet.py` / `tf2/model.py` (so a `tf.train.Checkpoint`
of it has the official TF2 variable paths) and as the TF1 `resnet.py` / `model_util.py` graph
(so `save_tf1` writes the official `base_model/conv2d_N` names), with the official inference
numerics: fixed padding of strided convs, TF 'SAME' max-pool, ResNet-D average pools, BN epsilon
1e-5, selective-kernel convs. Widths are `base * 2**stage` instead of `64 * width_multiplier`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

BN_EPSILON = 1e-5


class _Namer:
    """TF1 `tf.layers` naming: conv2d, conv2d_1, ... in creation order, per scope."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, scope: str, kind: str) -> str:
        n = self.counts.get((scope, kind), 0)
        self.counts[(scope, kind)] = n + 1
        return f"{scope}/{kind}" + (f"_{n}" if n else "")


class _Ctx:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.name = _Namer()
        self.tf1: dict[str, tf.Variable] = {}

    def var(self, tf1_name: str, value: np.ndarray) -> tf.Variable:
        v = tf.Variable(value.astype(np.float32))
        self.tf1[tf1_name] = v
        return v


class Conv2D(tf.Module):
    def __init__(self, ctx, cin, cout, k, scope="base_model"):
        super().__init__()
        w = ctx.rng.normal(0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, cout))
        self.kernel = ctx.var(ctx.name(scope, "conv2d") + "/kernel", w)

    def __call__(self, x, strides=1, padding="SAME"):
        return tf.nn.conv2d(x, self.kernel, strides, padding)


class FixedPadding(tf.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def __call__(self, x):
        beg = (self.k - 1) // 2
        end = self.k - 1 - beg
        return tf.pad(x, [[0, 0], [beg, end], [beg, end], [0, 0]])


class Conv2dFixedPadding(tf.Module):
    def __init__(self, ctx, cin, cout, k, strides):
        super().__init__()
        self.strides = strides
        self.fixed_padding = FixedPadding(k) if strides > 1 else None
        self.conv2d = Conv2D(ctx, cin, cout, k)

    def __call__(self, x):
        if self.fixed_padding is not None:
            return self.conv2d(self.fixed_padding(x), self.strides, "VALID")
        return self.conv2d(x, 1, "SAME")


class BN(tf.Module):
    def __init__(self, ctx, c, center=True, scope="base_model"):
        super().__init__()
        r, name = ctx.rng, ctx.name(scope, "batch_normalization")
        self.gamma = ctx.var(name + "/gamma", r.uniform(0.5, 1.5, c))
        self.beta = ctx.var(name + "/beta", r.normal(0, 0.2, c)) if center else None
        self.moving_mean = ctx.var(name + "/moving_mean", r.normal(0, 0.2, c))
        self.moving_variance = ctx.var(name + "/moving_variance", r.uniform(0.5, 1.5, c))

    def __call__(self, x):
        return tf.nn.batch_normalization(
            x, self.moving_mean, self.moving_variance, self.beta, self.gamma, BN_EPSILON
        )


class BatchNormRelu(tf.Module):
    def __init__(self, ctx, c, relu=True, center=True, scope="base_model"):
        super().__init__()
        self.relu = relu
        self.bn = BN(ctx, c, center, scope)

    def __call__(self, x):
        x = self.bn(x)
        return tf.nn.relu(x) if self.relu else x


class Pool(tf.Module):
    """MaxPooling2D / AveragePooling2D / Identity / DropBlock (inference): no variables."""

    def __init__(self, kind, size=0, strides=1, padding="SAME"):
        super().__init__()
        self.kind, self.size, self.strides, self.padding = kind, size, strides, padding

    def __call__(self, x):
        if self.kind == "max":
            return tf.nn.max_pool2d(x, self.size, self.strides, self.padding)
        if self.kind == "avg":
            return tf.nn.avg_pool2d(x, self.size, self.strides, self.padding)
        return x


class SK_Conv2D(tf.Module):  # noqa: N801 (the official class name)
    def __init__(self, ctx, cin, filters, strides, sk_ratio, min_dim=32):
        super().__init__()
        self.filters = filters
        self.conv2d_fixed_padding = Conv2dFixedPadding(ctx, cin, 2 * filters, 3, strides)
        self.batch_norm_relu = BatchNormRelu(ctx, 2 * filters)
        mid = max(int(filters * sk_ratio), min_dim)
        self.conv2d_0 = Conv2D(ctx, filters, mid, 1)
        self.batch_norm_relu_1 = BatchNormRelu(ctx, mid)
        self.conv2d_1 = Conv2D(ctx, mid, 2 * filters, 1)

    def __call__(self, x):
        x = self.batch_norm_relu(self.conv2d_fixed_padding(x))
        x = tf.stack(tf.split(x, 2, axis=3))
        g = tf.reduce_mean(tf.reduce_sum(x, axis=0), [1, 2], keepdims=True)
        g = self.batch_norm_relu_1(self.conv2d_0(g))
        mix = tf.nn.softmax(tf.stack(tf.split(self.conv2d_1(g), 2, axis=3)), axis=0)
        return tf.reduce_sum(x * mix, axis=0)


def _projection(ctx, cin, cout, strides, sk):
    layers = []
    if sk:  # ResNet-D
        if strides > 1:
            layers.append(FixedPadding(2))
        layers.append(Pool("avg", 2, strides, "SAME" if strides == 1 else "VALID"))
        layers.append(Conv2dFixedPadding(ctx, cin, cout, 1, 1))
    else:
        layers.append(Conv2dFixedPadding(ctx, cin, cout, 1, strides))
    layers.append(BatchNormRelu(ctx, cout, relu=False))
    return layers


class BottleneckBlock(tf.Module):
    def __init__(self, ctx, cin, filters, strides, use_projection, sk_ratio):
        super().__init__()
        sk = sk_ratio > 0
        self.projection_layers = (
            _projection(ctx, cin, 4 * filters, strides, sk) if use_projection else []
        )
        self.shortcut_dropblock = Pool("drop")
        layers = [Conv2dFixedPadding(ctx, cin, filters, 1, 1), BatchNormRelu(ctx, filters)]
        layers.append(Pool("drop"))
        if sk:
            layers.append(SK_Conv2D(ctx, filters, filters, strides, sk_ratio))
        else:
            layers.append(Conv2dFixedPadding(ctx, filters, filters, 3, strides))
            layers.append(BatchNormRelu(ctx, filters))
        layers.append(Pool("drop"))
        layers.append(Conv2dFixedPadding(ctx, filters, 4 * filters, 1, 1))
        layers.append(BatchNormRelu(ctx, 4 * filters, relu=False))
        layers.append(Pool("drop"))
        self.conv_relu_dropblock_layers = layers

    def __call__(self, x):
        shortcut = x
        for layer in self.projection_layers:
            shortcut = layer(shortcut)
        for layer in self.conv_relu_dropblock_layers:
            x = layer(x)
        return tf.nn.relu(x + shortcut)


class ResidualBlock(tf.Module):
    def __init__(self, ctx, cin, filters, strides, use_projection, sk_ratio):
        super().__init__()
        self.shortcut_layers = (
            _projection(ctx, cin, filters, strides, sk_ratio > 0) if use_projection else []
        )
        self.conv2d_bn_layers = [
            Conv2dFixedPadding(ctx, cin, filters, 3, strides),
            BatchNormRelu(ctx, filters),
            Conv2dFixedPadding(ctx, filters, filters, 3, 1),
            BatchNormRelu(ctx, filters, relu=False),
        ]

    def __call__(self, x):
        shortcut = x
        for layer in self.shortcut_layers:
            shortcut = layer(shortcut)
        for layer in self.conv2d_bn_layers:
            x = layer(x)
        return tf.nn.relu(x + shortcut)


class BlockGroup(tf.Module):
    def __init__(self, ctx, block_fn, cin, filters, blocks, strides, sk_ratio):
        super().__init__()
        expansion = 4 if block_fn is BottleneckBlock else 1
        self.layers = [block_fn(ctx, cin, filters, strides, True, sk_ratio)]
        for _ in range(1, blocks):
            self.layers.append(block_fn(ctx, filters * expansion, filters, 1, False, sk_ratio))

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


LAYOUTS = {18: (ResidualBlock, [2, 2, 2, 2]), 50: (BottleneckBlock, [3, 4, 6, 3])}


class Resnet(tf.Module):
    def __init__(self, ctx, depth, base, sk_ratio, cifar_stem=False):
        super().__init__()
        block_fn, layers = LAYOUTS[depth]
        stem = []
        if cifar_stem:
            stem += [Conv2dFixedPadding(ctx, 3, base, 3, 1), Pool("id"), BatchNormRelu(ctx, base)]
            stem += [Pool("id")]
        else:
            if sk_ratio > 0:
                stem += [Conv2dFixedPadding(ctx, 3, base // 2, 3, 2), BatchNormRelu(ctx, base // 2)]
                stem += [
                    Conv2dFixedPadding(ctx, base // 2, base // 2, 3, 1),
                    BatchNormRelu(ctx, base // 2),
                ]
                stem += [Conv2dFixedPadding(ctx, base // 2, base, 3, 1)]
            else:
                stem += [Conv2dFixedPadding(ctx, 3, base, 7, 2)]
            stem += [Pool("id"), BatchNormRelu(ctx, base), Pool("max", 3, 2, "SAME"), Pool("id")]
        self.initial_conv_relu_max_pool = stem
        expansion = 4 if block_fn is BottleneckBlock else 1
        self.block_groups = []
        cin = base
        for g, blocks in enumerate(layers):
            filters = base * 2**g
            self.block_groups.append(
                BlockGroup(ctx, block_fn, cin, filters, blocks, 1 if g == 0 else 2, sk_ratio)
            )
            cin = filters * expansion
        self.out_dim = cin

    def __call__(self, x):
        for layer in self.initial_conv_relu_max_pool:
            x = layer(x)
        for group in self.block_groups:
            x = group(x)
        return tf.reduce_mean(x, [1, 2])


class Dense(tf.Module):
    def __init__(self, ctx, scope, cin, cout, use_bias):
        super().__init__()
        w = ctx.rng.normal(0, 1 / np.sqrt(cin), (cin, cout))
        self.kernel = ctx.var(f"{scope}/dense/kernel", w)
        self.bias = (
            ctx.var(f"{scope}/dense/bias", ctx.rng.normal(0, 0.1, cout)) if use_bias else None
        )

    def __call__(self, x):
        x = tf.matmul(x, self.kernel)
        return x + self.bias if self.bias is not None else x


class LinearLayer(tf.Module):
    def __init__(self, ctx, scope, cin, cout, use_bias=True, use_bn=False):
        super().__init__()
        self.dense = Dense(ctx, scope, cin, cout, use_bias and not use_bn)
        self.bn_relu = BatchNormRelu(ctx, cout, False, use_bias, scope) if use_bn else None

    def __call__(self, x):
        x = self.dense(x)
        return self.bn_relu(x) if self.bn_relu is not None else x


class ProjectionHead(tf.Module):
    def __init__(self, ctx, cin, num_layers, out_dim):
        super().__init__()
        self.linear_layers = []
        for j in range(num_layers):
            last = j == num_layers - 1
            self.linear_layers.append(
                LinearLayer(
                    ctx, f"head_contrastive/nl_{j}", cin, out_dim if last else cin, not last, True
                )
            )

    def __call__(self, x):
        outs = [x]
        for j, layer in enumerate(self.linear_layers):
            x = layer(x)
            if j != len(self.linear_layers) - 1:
                x = tf.nn.relu(x)
            outs.append(x)
        return outs


class SupervisedHead(tf.Module):
    def __init__(self, ctx, cin, num_classes):
        super().__init__()
        self.linear_layer = LinearLayer(ctx, "head_supervised/linear_layer", cin, num_classes)

    def __call__(self, x):
        return self.linear_layer(x)


class Model(tf.Module):
    """`resnet_model`, `_projection_head` (v2: 3 layers) and `supervised_head`, as tf2/model.py."""

    def __init__(self, depth, base, sk_ratio, head_layers=3, out_dim=8, num_classes=5, seed=0,
                 cifar_stem=False):  # fmt: skip
        super().__init__()
        self.ctx = _Ctx(seed)
        self.resnet_model = Resnet(self.ctx, depth, base, sk_ratio, cifar_stem)
        dim = self.resnet_model.out_dim
        self._projection_head = (
            ProjectionHead(self.ctx, dim, head_layers, out_dim) if head_layers else None
        )
        self.supervised_head = SupervisedHead(self.ctx, dim, num_classes) if num_classes else None

    def __call__(self, images):
        """Inference outputs: pooled features, projection head output, supervised logits."""
        feats = self.resnet_model(tf.constant(images, tf.float32))
        out = {"features": feats.numpy()}
        if self._projection_head is not None:
            out["projection"] = self._projection_head(feats)[-1].numpy()
        if self.supervised_head is not None:
            out["logits"] = self.supervised_head(feats).numpy()
        return out


class _Optimizer(tf.Module):
    """Stands in for the optimizer of tf2/run.py's checkpoint: iterations + momentum slots."""

    def __init__(self, model):
        super().__init__()
        self.iterations = tf.Variable(7, dtype=tf.int64)
        self.momentum = [tf.Variable(tf.zeros_like(v)) for v in list(model.ctx.tf1.values())[:3]]


def save_tf2(model: Model, directory: str) -> str:
    """`tf.train.Checkpoint(model=, global_step=, optimizer=)` as tf2/run.py writes; the prefix."""
    ckpt = tf.train.Checkpoint(
        model=model, global_step=tf.Variable(7, dtype=tf.int64), optimizer=_Optimizer(model)
    )
    return ckpt.write(f"{directory}/ckpt-7")


def save_saved_model(model: Model, directory: str) -> str:
    """A SavedModel like the simclr-checkpoints-tf2 releases (root.model + variable list)."""
    root = tf.Module()
    root.model = model
    root.trainable_variables_list = list(model.ctx.tf1.values())
    tf.saved_model.save(root, directory)
    return directory


def save_tf1(model: Model, prefix: str) -> str:
    """A name-based TF1 checkpoint (`model.ckpt-N`) with the official names and Momentum slots."""
    names, tensors = [], []
    for name, v in model.ctx.tf1.items():
        names += [name, name + "/Momentum"]
        tensors += [v, tf.zeros_like(v)]
    names.append("global_step")
    tensors.append(tf.constant(7, tf.int64))
    tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    return prefix
