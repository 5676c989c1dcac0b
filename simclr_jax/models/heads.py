"""Projection head (SimCLR v1/v2) and the online linear-evaluation head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.resnet import BN_EPSILON, BN_MOMENTUM


class ProjectionHead(nn.Module):
    """MLP projection head: (Dense -> BN -> ReLU) x (num_layers - 1) -> Dense -> BN (no shift).

    SimCLR v1 uses 2 layers, v2 uses 3 with BN in every layer. Returns the list of every layer's
    output, the input first, so fine-tuning can start from a middle layer (SimCLR v2).
    `out_scale=False` drops the last BN's scale too (SimSiam's projector: an affine-free BN).
    """

    num_layers: int = 2
    num_used: int | None = None  # compute only the first k layers (fine-tuning from layer k)
    hidden_dim: int = 2048
    out_dim: int = 128
    use_bn: bool = True
    out_scale: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> list[jnp.ndarray]:
        outputs = [x]
        used = self.num_layers if self.num_used is None else self.num_used
        for i in range(used):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.out_dim if last else self.hidden_dim,
                use_bias=not self.use_bn,
                dtype=self.dtype,
                name=f"dense{i + 1}",
            )(x)
            if self.use_bn:
                # The final BN has no shift, as in SimCLR v2: a bias there is a no-op for the
                # cosine-similarity loss.
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    use_bias=not last,
                    use_scale=self.out_scale or not last,
                    dtype=self.dtype,
                    name=f"bn{i + 1}",
                )(x)
            if not last:
                x = nn.relu(x)
            outputs.append(x.astype(jnp.float32))
        return outputs


class LinearHead(nn.Module):
    """Linear classifier on stop-gradient features (online linear evaluation)."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        features = jax.lax.stop_gradient(features.astype(jnp.float32))
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="dense")(features)


class Predictor(nn.Module):
    """BYOL / SimSiam / MoCo v3 predictor: Dense -> BN -> ReLU -> Dense (-> BN).

    BYOL and SimSiam: no BN on the output, a bias on the last Dense (the defaults). MoCo v3:
    no bias on the last Dense (`out_bias=False`, its ResNet predictor), and for ViTs an
    affine-free BN on the output (`out_bn=True`, which also drops that bias: BN cancels it).
    """

    hidden_dim: int = 4096
    out_dim: int = 256
    dtype: Any = jnp.float32
    out_bias: bool = True
    out_bn: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name="dense1")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            name="bn1",
        )(x)
        x = nn.Dense(
            self.out_dim,
            use_bias=self.out_bias and not self.out_bn,
            dtype=self.dtype,
            name="dense2",
        )(nn.relu(x))
        if self.out_bn:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                use_bias=False,
                use_scale=False,
                dtype=self.dtype,
                name="bn2",
            )(x)
        return x.astype(jnp.float32)
