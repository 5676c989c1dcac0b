"""Deep InfoMax's network: encoder, global code (the projection head) and a local-feature head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.heads import LinearHead, ProjectionHead
from simclr_jax.models.resnet import BN_EPSILON, BN_MOMENTUM


class LocalHead(nn.Module):
    """DIM's 1x1 "MI network" on local features `[B, M, C]`: an MLP plus a linear shortcut, then LN.

    (Dense -> BN -> ReLU -> Dense) + Dense, LayerNorm: the paper's local encoder, whose shortcut
    keeps the scores from starting at zero.
    """

    hidden_dim: int = 512
    out_dim: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        y = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name="dense1")(x)
        y = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            name="bn1",
        )(y)
        y = nn.Dense(self.out_dim, dtype=self.dtype, name="dense2")(nn.relu(y))
        y = y + nn.Dense(self.out_dim, dtype=self.dtype, name="shortcut")(x)
        return nn.LayerNorm(dtype=jnp.float32, name="ln")(y.astype(jnp.float32))


class LocalGlobalModel(nn.Module):
    """Encoder + projection head (the global code) + local head + online linear head.

    Returns SimCLRModel's outputs plus `'local'` `[B, M, out_dim]`, the local head on the
    encoder's local features (`encoder(x, with_local=True)`).
    """

    encoder: Any
    head: ProjectionHead
    local_head: LocalHead
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> dict[str, Any]:
        features, local = self.encoder(x, train=train, with_local=True)
        head_outputs = self.head(features, train=train)
        return {
            "features": features,
            "projection": head_outputs[-1],
            "head_outputs": head_outputs,
            "logits": LinearHead(self.num_classes, name="linear_head")(features),
            "local": self.local_head(local, train=train),
        }
