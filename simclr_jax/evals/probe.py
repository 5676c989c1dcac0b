"""The fast linear probe: a linear classifier trained on device on a precomputed feature bank.

The centre-crop features of the train split are extracted once (`knn.feature_bank`, sharded over
the devices) and standardised; the classifier then trains in one jitted loop over minibatches
gathered from the bank, with the optimizer and schedule of `config.linear_eval`. No augmentation
and no checkpoint: for small datasets and the end-of-pretraining evaluation, not the protocol run
on ImageNet (`--mode=linear_eval` streams images by default).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax.evals import classifier
from simclr_jax.runtime import compiled, keys


def linear_probe(
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    num_classes: int,
    section: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    epochs: float,
    seed: int,
    trust_coefficient: float = 1e-3,
) -> dict[str, float]:
    """`{'top1', 'top5', 'num_labels', 'steps'}` of a linear layer trained on `train`'s bank.

    Banks are `(features [nb, B, D], labels [nb, B])` with label -1 on padding rows.
    """
    x, y = train
    d = x.shape[-1]
    n_rows = x.shape[0] * x.shape[1]
    n_valid = int(jax.device_get(jnp.sum(y >= 0)))
    batch = classifier.global_batch(section.batch_size, mesh, n_valid)
    spe = max(n_valid // batch, 1)
    total = max(int(round(epochs * spe)), 1)
    params = {
        "kernel": jnp.zeros((d, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    tx, _ = classifier.make_optimizer(section, params, batch, total, spe, trust_coefficient)

    def fit(x, y):
        x, y = x.reshape(n_rows, d), y.reshape(n_rows)
        w = (y >= 0).astype(jnp.float32)[:, None]
        mean = jnp.sum(x * w, 0) / n_valid
        std = jnp.sqrt(jnp.sum(jnp.square(x - mean) * w, 0) / n_valid) + 1e-6
        xs = (x - mean) / std
        key = keys.derive(seed, keys.PROBE)

        def step(t, carry):
            p, opt = carry
            # Valid rows first, in a fresh random order each epoch.
            order = jnp.argsort(
                jnp.where(
                    y >= 0, jax.random.uniform(jax.random.fold_in(key, t // spe), (n_rows,)), 2.0
                )
            )
            idx = jax.lax.dynamic_slice_in_dim(order, (t % spe) * batch, batch)

            def loss_fn(p):
                logits = xs[idx] @ p["kernel"] + p["bias"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

            grads = jax.grad(loss_fn)(p)
            updates, opt = tx.update(grads, opt, p)
            return optax.apply_updates(p, updates), opt

        p, _ = jax.lax.fori_loop(0, total, step, (params, tx.init(params)))
        return p, mean, std

    p, mean, std = compiled.cached(lambda: jax.jit(fit))(x, y)

    def counts(p, mean, std, xb, yb):
        logits = ((xb - mean) / std) @ p["kernel"] + p["bias"]
        mask = yb >= 0
        return jnp.stack(
            [
                jnp.sum(classifier.topk_correct(logits, yb, 1) & mask),
                jnp.sum(classifier.topk_correct(logits, yb, 5) & mask),
                jnp.sum(mask),
            ]
        ).astype(jnp.int32)

    counts_fn = compiled.cached(lambda: jax.jit(counts))
    tx_, ty_ = test
    total_counts = jnp.zeros((3,), jnp.int32)
    for i in range(tx_.shape[0]):
        total_counts = total_counts + counts_fn(p, mean, std, tx_[i], ty_[i])
    hits1, hits5, count = (int(v) for v in np.asarray(jax.device_get(total_counts)))
    out: dict[str, Any] = {"top1": hits1 / max(count, 1), "top5": hits5 / max(count, 1)}
    return {**out, "num_labels": n_valid, "steps": total, "num_examples": count}


def probe_on_banks(
    config: ml_collections.ConfigDict,
    banks: list[tuple[jax.Array, jax.Array]],
    num_classes: int,
    section: ml_collections.ConfigDict,
    mesh: Mesh,
) -> dict[str, float]:
    """`linear_probe` of (train, test) banks for section.epochs, seeded as the run is."""
    return linear_probe(
        *banks,
        num_classes,
        section,
        mesh,
        epochs=section.epochs,
        seed=config.seed,
        trust_coefficient=config.optim.trust_coefficient,
    )
