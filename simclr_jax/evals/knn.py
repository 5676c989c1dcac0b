"""Weighted kNN (InstDisc / SimCLR: cosine, k=200, weights exp(sim / T)) on a sharded bank.

The train split's features are extracted in one streamed pass into a bank that stays sharded
over the devices: `[num_batches, B, D]` with the batch axis on 'data', so each device keeps the
rows it computed and nothing moves. A query batch is gathered to every device, which takes its
local top-k; the candidates of all devices are gathered and merged into the global top-k. The
whole bank is never on one device nor in host memory.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax.data import labelled
from simclr_jax.runtime import compiled, loop, parallel


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _as_input(x: jax.Array) -> jax.Array:
    """The encoder's input: int token ids as they are, uint8 images as float in [0, 1]."""
    if jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 2:
        return x
    return x.astype(jnp.float32) / 255.0


def bank_sharding(mesh: Mesh) -> NamedSharding:
    """`[num_batches, B, ...]` with B split over 'data': each device holds its rows."""
    return NamedSharding(mesh, P(None, parallel.DATA_AXIS))


def feature_bank(
    apply_fn: Any,
    variables: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    split: str = "train",
    batch_size: int = 0,
    max_examples: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """(features `[nb, B, D]`, labels `[nb, B]`, -1 on padding), both sharded on B.

    `apply_fn(variables, float images or int32 tokens) -> features`; one streamed pass over
    the split (a text dataset's batches hold 'tokens', given as they are).
    """
    n = mesh.devices.size
    batch = max(n, (batch_size or config.eval.batch_size) // n * n)
    batches, nb = labelled.eval_batches(config, split, batch, max_examples=max_examples)
    rep, sharded, bank_sh = (
        parallel.replicated(mesh),
        parallel.data_sharded(mesh),
        bank_sharding(mesh),
    )
    extract = compiled.cached(
        lambda: jax.jit(
            lambda v, x: apply_fn(v, _as_input(x)).astype(jnp.float32),
            in_shardings=(rep, sharded),
            out_shardings=sharded,
        ),
    )
    put = compiled.cached(
        lambda: jax.jit(
            lambda bank, i, row: jax.lax.dynamic_update_index_in_dim(bank, row, i, 0),
            in_shardings=(bank_sh, None, sharded),
            out_shardings=bank_sh,
            donate_argnums=(0,),
        ),
    )
    bank = labels = None
    for i in range(nb):
        b = parallel.host_to_global(next(batches), mesh)
        feats = extract(variables, b["tokens"] if "tokens" in b else b["image"])
        y = jnp.where(b["mask"], b["label"], -1)
        if bank is None:
            shape = (nb, batch, feats.shape[-1])
            bank = compiled.cached(
                lambda shape=shape: jax.jit(
                    lambda: (
                        jnp.zeros(shape, jnp.float32),
                        jnp.full(shape[:2], -1, jnp.int32),
                    ),
                    out_shardings=(bank_sh, bank_sh),
                ),
            )()
            bank, labels = bank
        bank = put(bank, i, feats)
        labels = put(labels, i, y.astype(jnp.int32))
    loop.finish_eval_stream(f"feature bank of {config.dataset} {split}", batches)
    if bank is None:
        raise ValueError(f"the {split} split of {config.dataset} is empty: no kNN bank")
    return bank, labels


def _local_votes(
    bank: jax.Array,
    labels: jax.Array,
    queries: jax.Array,
    *,
    k: int,
    temperature: float,
    num_classes: int,
) -> jax.Array:
    """Inside shard_map: this device's query rows' class votes `[q, C]` over the global top-k."""
    axis = parallel.DATA_AXIS
    q_all = _normalize(jax.lax.all_gather(queries, axis, tiled=True))  # [Q, D]
    feats = _normalize(bank.reshape(-1, bank.shape[-1]))
    lab = labels.reshape(-1)
    sims = jnp.where(lab[None] >= 0, q_all @ feats.T, -jnp.inf)  # [Q, n_local]
    k_local = min(k, sims.shape[1])
    s, idx = jax.lax.top_k(sims, k_local)
    s = jax.lax.all_gather(s, axis, axis=1, tiled=True)  # [Q, devices * k_local]
    cand = jax.lax.all_gather(lab[idx], axis, axis=1, tiled=True)
    s, j = jax.lax.top_k(s, min(k, s.shape[1]))
    cand = jnp.take_along_axis(cand, j, axis=1)
    weights = jnp.where(cand >= 0, jnp.exp(s / temperature), 0.0)
    rows = jnp.arange(s.shape[0])[:, None]
    votes = jnp.zeros((s.shape[0], num_classes)).at[rows, jnp.maximum(cand, 0)].add(weights)
    q = queries.shape[0]
    return jax.lax.dynamic_slice_in_dim(votes, jax.lax.axis_index(axis) * q, q, 0)


def knn_votes(
    bank: jax.Array,
    labels: jax.Array,
    queries: jax.Array,
    mesh: Mesh,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int,
) -> jax.Array:
    """Class votes `[Q, C]` (sharded like `queries` `[Q, D]` on 'data') of the weighted kNN."""
    fn = _votes_fn(mesh, k, temperature, num_classes)
    return fn(bank, labels, jax.device_put(queries, parallel.data_sharded(mesh)))


@functools.lru_cache(maxsize=16)
def _votes_fn(mesh: Mesh, k: int, temperature: float, num_classes: int) -> Any:
    spec = P(None, parallel.DATA_AXIS)
    return jax.jit(
        jax.shard_map(
            functools.partial(_local_votes, k=k, temperature=temperature, num_classes=num_classes),
            mesh=mesh,
            in_specs=(spec, spec, P(parallel.DATA_AXIS)),
            out_specs=P(parallel.DATA_AXIS),
        )
    )


def knn_on_banks(
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    mesh: Mesh,
    *,
    k: int,
    temperature: float,
    num_classes: int,
) -> dict[str, float]:
    """`{'top1', 'top5', 'num_examples'}` of the weighted kNN of `test`'s rows on `train`'s bank."""
    votes_fn = _votes_fn(mesh, int(k), float(temperature), num_classes)

    def make() -> Any:
        @jax.jit
        def counts(bank, bank_labels, queries, labels):
            votes = votes_fn(bank, bank_labels, queries)
            hit = jax.lax.top_k(votes, min(5, num_classes))[1] == labels[:, None]
            mask = labels >= 0
            return jnp.stack(
                [jnp.sum(hit[:, 0] & mask), jnp.sum(jnp.any(hit, 1) & mask), jnp.sum(mask)]
            ).astype(jnp.int32)

        return counts

    counts = compiled.cached(make)

    total = jnp.zeros((3,), jnp.int32)
    test_x, test_y = test
    for i in range(test_x.shape[0]):
        total = total + counts(*train, test_x[i], test_y[i])
    hits1, hits5, count = (int(x) for x in np.asarray(jax.device_get(total)))
    return {"top1": hits1 / max(count, 1), "top5": hits5 / max(count, 1), "num_examples": count}


def knn_evaluate(
    apply_fn: Any,
    variables: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    num_classes: int,
    *,
    max_examples: int = 0,
) -> dict[str, float]:
    """The weighted kNN of the test split's features on the train split's (`config.eval.knn_*`)."""
    banks = [
        feature_bank(apply_fn, variables, config, mesh, split, 0, max_examples)
        for split in ("train", "test")
    ]
    return knn_on_banks(
        *banks,
        mesh,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
        num_classes=num_classes,
    )
