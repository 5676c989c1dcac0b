"""InstDisc (Wu, Xiong, Yu, Lin 2018): instance discrimination against a memory bank.

`config.method = 'instdisc'`. Every training example `i` has one L2-normalised embedding
`v_i` (the projection head's output, `model.head_out_dim`, 128 in the paper) in a memory bank.
Each step, both views of example `i` are queries whose positive is `v_i` and whose negatives
are K bank rows drawn uniformly (shared by the whole global batch: one `[K, D]` gather, as
MoCo's queue, instead of per-query draws that would cost `B x K x D`). The loss is the paper's
NCE (`instdisc.loss='nce'`, its normaliser Z estimated once from the first step's negatives and
then fixed) or InfoNCE (`'infonce'`). After the update, `v_i <- normalise(m v_i + (1 - m) f_i)`
with `f_i` the normalised mean of the two views' normalised embeddings (the paper used one
view per example and step).

State (`TrainState.method_state`): `{'bank': [N_pad, D] fp32, 'z': fp32 scalar (0 until set)}`.
The bank is **sharded by rows** over the mesh axis 'data' (`state_sharding`): every read (the
positives at the batch's indices, the K negatives) and the momentum write runs inside
`jax.shard_map`, where each device touches only the rows it owns (a masked local gather summed
over devices; a local scatter of the global batch's rows), so a device holds `N_pad / n` rows.
Example indices come from the data pipeline (`needs_index`: `batch['index']`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax import losses
from simclr_jax.config.checks import check
from simclr_jax.methods import base
from simclr_jax.methods.state import TrainState, make_views, online_linear_metrics, step_key
from simclr_jax.runtime import parallel

log = logging.getLogger(__name__)

AXIS = parallel.DATA_AXIS
LOSSES = ("nce", "infonce")
_ROW_UNIT = 256  # the bank's rows are padded to a multiple of lcm(device count, this)
_NEGATIVES_SALT = 0x1D15C  # folded into the step key for the negatives' indices


def config_defaults() -> ml_collections.ConfigDict:
    """`config.instdisc`: the paper's ImageNet settings (capped to the dataset's size)."""
    c = ml_collections.ConfigDict()
    c.bank_momentum = 0.5  # v_i <- normalise(m v_i + (1 - m) f_i)
    c.num_negatives = 4096  # K bank rows per step, shared by the global batch (cap: N - 1)
    c.temperature = 0.07
    c.loss = "nce"  # 'nce' (the paper; Z fixed after the first step) or 'infonce'
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Momentum in [0, 1), K > 0, temperature > 0, a known loss."""
    ic = c.instdisc
    check(0 <= ic.bank_momentum < 1, "instdisc.bank_momentum", ic.bank_momentum, "in [0, 1)")
    check(
        isinstance(ic.num_negatives, int) and ic.num_negatives > 0,
        "instdisc.num_negatives",
        ic.num_negatives,
        "a positive int (capped to the training examples minus one)",
    )
    check(ic.temperature > 0, "instdisc.temperature", ic.temperature, "> 0")
    check(ic.loss in LOSSES, "instdisc.loss", ic.loss, f"one of {list(LOSSES)}")


def bank_rows(num_examples: int) -> int:
    """The bank's rows: `num_examples` padded to a multiple of lcm(device count, 256).

    The padding rows are never read (indices and negatives are < num_examples); the 256 keeps
    the bank's shape, and so its checkpoint, the same on any power-of-two device count <= 256.
    """
    unit = math.lcm(jax.device_count(), _ROW_UNIT)
    return -(-num_examples // unit) * unit


def num_negatives(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """K: `instdisc.num_negatives`, capped to `num_examples - 1`."""
    return max(1, min(int(config.instdisc.num_negatives), num_examples - 1))


def init_state(
    config: ml_collections.ConfigDict, variables: Any, key: jax.Array, n: int
) -> dict[str, jax.Array]:
    """A bank of random unit vectors `[bank_rows(n), head_out_dim]` and Z = 0 (not yet set)."""
    bank = jax.random.normal(key, (bank_rows(n), config.model.head_out_dim), jnp.float32)
    return {"bank": losses.l2_normalize(bank), "z": jnp.zeros((), jnp.float32)}


def state_sharding(mesh: Mesh, method_state: Any) -> dict[str, NamedSharding]:
    """The bank sharded by rows over 'data', Z replicated."""
    rows, n = method_state["bank"].shape[0], mesh.shape[AXIS]
    if rows % n:
        raise ValueError(
            f"the InstDisc bank's {rows} rows do not split over {n} devices; the bank is "
            f"padded for jax.device_count()={jax.device_count()}: use a mesh of all devices"
        )
    return {"bank": NamedSharding(mesh, P(AXIS)), "z": NamedSharding(mesh, P())}


# ------------------------------------------------------------ the sharded bank (shard_map)


def _owned(bank: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: (this device's local rows of global `index`, which of them it owns)."""
    rows = bank.shape[0]
    local = index - jax.lax.axis_index(AXIS) * rows
    return local, (local >= 0) & (local < rows)


def _local_gather(bank: jax.Array, index: jax.Array) -> jax.Array:
    """The owned rows of `index` from the local shard, zeros elsewhere."""
    local, mine = _owned(bank, index)
    rows = bank[jnp.clip(local, 0, bank.shape[0] - 1)]
    return jnp.where(mine[:, None], rows, jnp.zeros_like(rows))


def read_rows(mesh: Mesh) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(bank sharded on 'data', index [M] replicated) -> bank[index]` replicated `[M, D]`.

    Each device gathers the rows it owns and a psum adds the (exactly zero) others in.
    """

    def read(bank: jax.Array, index: jax.Array) -> jax.Array:
        return jax.lax.psum(_local_gather(bank, index), AXIS)

    return jax.shard_map(read, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P())


def read_batch_rows(mesh: Mesh) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(bank, index [B] on 'data') -> bank[index]` `[B, D]` on 'data' (each device its rows)."""

    def read(bank: jax.Array, index: jax.Array) -> jax.Array:
        rows = _local_gather(bank, jax.lax.all_gather(index, AXIS, tiled=True))
        return jax.lax.psum_scatter(rows, AXIS, scatter_dimension=0, tiled=True)

    return jax.shard_map(read, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS))


def write_rows(mesh: Mesh) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`(bank, index [B], rows [B, D], both on 'data') -> bank with bank[index] = rows`.

    The global batch's indices and rows are all-gathered (small); each device writes the ones
    it owns into its shard (`mode='drop'` skips the others).
    """

    def write(bank: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
        index = jax.lax.all_gather(index, AXIS, tiled=True)
        rows = jax.lax.all_gather(rows, AXIS, tiled=True)
        local, mine = _owned(bank, index)
        local = jnp.where(mine, local, bank.shape[0])  # out of range: dropped
        return bank.at[local].set(rows.astype(bank.dtype), mode="drop")

    return jax.shard_map(write, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS)), out_specs=P(AXIS))


def update_rows(old: jax.Array, views: jax.Array, momentum: float | jax.Array) -> jax.Array:
    """New bank rows: `normalise(m old + (1 - m) normalise(mean of normalised views))`.

    `old [B, D]` the rows before the step, `views [B, V, D]` the batch's embeddings.
    """
    f = losses.l2_normalize(jnp.mean(losses.l2_normalize(views), axis=1))
    return losses.l2_normalize(momentum * old + (1.0 - momentum) * f)


def estimate_z(
    q: jax.Array,
    negatives: jax.Array,
    temperature: float,
    num_data: int,
    axis_name: losses.AxisName = None,
) -> jax.Array:
    """The paper's Monte-Carlo normaliser: `Z = N x mean over queries, negatives of exp(s/t)`."""
    s = jnp.dot(
        losses.l2_normalize(q),
        losses.l2_normalize(negatives).T,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jax.lax.stop_gradient(losses.global_mean(jnp.exp(s / temperature), axis_name) * num_data)


def instdisc_loss(
    q: jax.Array,
    positives: jax.Array,
    negatives: jax.Array,
    z: jax.Array,
    *,
    loss: str,
    temperature: float,
    num_data: int,
    axis_name: losses.AxisName = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(loss, accuracy, Z used)` of queries `q [V B, D]` (views of an example adjacent).

    `positives [B, D]`: each example's bank row (shared by its V views); `negatives [K, D]`.
    NCE uses `z` once it is > 0, else the estimate from these negatives. Inside shard_map with
    `axis_name`, means are over the global batch.
    """
    k = jnp.repeat(jax.lax.stop_gradient(positives), q.shape[0] // positives.shape[0], axis=0)
    negatives = jax.lax.stop_gradient(negatives)
    if loss == "infonce":
        value, acc = losses.info_nce(q, k, negatives, temperature, axis_name)
        return value, acc, jnp.zeros((), jnp.float32)
    z = jnp.where(z > 0, z, estimate_z(q, negatives, temperature, num_data, axis_name))
    value, acc = losses.instdisc_nce(q, k, negatives, temperature, jnp.log(z), num_data, axis_name)
    return value, acc, z


def _sharded_loss(mesh: Mesh, **kwargs: Any) -> Callable[..., tuple[Any, Any, Any]]:
    """`instdisc_loss` with each device's queries and positives against the shared negatives."""
    return jax.shard_map(
        functools.partial(instdisc_loss, axis_name=AXIS, **kwargs),
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS), P(), P()),
        out_specs=(P(), P(), P()),
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    total_steps: int = 0,
    num_train_examples: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One InstDisc update: read the bank -> loss -> optimizer -> momentum write of the batch."""
    if "index" not in batch:
        raise ValueError(
            "method='instdisc' needs batch['index'] (data.pretrain_iterator(with_index=True))"
        )
    total_steps = total_steps or int(config.total_steps)
    ic = config.instdisc
    n = num_train_examples  # bank rows in use; negatives are drawn from [0, N)
    if n <= 0:
        raise ValueError("method='instdisc' needs the training split's size (num_train_examples)")
    ms = state.method_state
    if ms["bank"].shape[0] < n:
        raise ValueError(f"the bank has {ms['bank'].shape[0]} rows for {n} training examples")
    key = step_key(state)
    x = make_views(key, batch["image"], config, batch.get("crop"))
    labels, index = batch["label"], batch["index"].astype(jnp.int32)
    b = labels.shape[0]
    neg_index = jax.random.randint(
        jax.random.fold_in(key, _NEGATIVES_SALT), (num_negatives(config, n),), 0, n
    )
    positives = read_batch_rows(mesh)(ms["bank"], index)
    negatives = read_rows(mesh)(ms["bank"], neg_index)
    loss_of = _sharded_loss(mesh, loss=ic.loss, temperature=ic.temperature, num_data=n)

    def loss_fn(params):
        out, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss, acc, z = loss_of(out["projection"], positives, negatives, ms["z"])
        linear = online_linear_metrics(out["logits"].reshape(b, 2, -1), labels)
        proj = out["projection"].reshape(b, 2, -1)
        aux = (loss, acc, z, linear, new_vars["batch_stats"], proj, out["features"])
        return loss + linear["linear_loss"], aux

    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
    loss, acc, z, linear, batch_stats, proj, features = aux
    rows = update_rows(positives, jax.lax.stop_gradient(proj), ic.bank_momentum)
    new_state = base.apply_gradients(state, grads, tx, batch_stats=batch_stats)
    new_state = new_state.replace(
        method_state={"bank": write_rows(mesh)(ms["bank"], index, rows), "z": z}
    )
    metrics = base.step_metrics(
        state.step,
        new_state,
        grads,
        loss,
        {"contrastive_acc": acc, **linear, "nce_z": z},
        (proj[:, 0], proj[:, 1], features),
        schedule=schedule,
        config=config,
        total_steps=total_steps,
    )
    return new_state, metrics


def resolve(c: ml_collections.ConfigDict, total_steps: int, num_train_examples: int) -> list[str]:
    """The bank and negatives this run uses (K capped to N - 1)."""
    n = num_train_examples
    k, asked = num_negatives(c, n), int(c.instdisc.num_negatives)
    lines = [
        f"InstDisc: memory bank of {n} x {c.model.head_out_dim} ({bank_rows(n)} rows sharded "
        f"over the devices), {k} negatives per step, {c.instdisc.loss} loss, "
        f"T {c.instdisc.temperature:g}, bank momentum {c.instdisc.bank_momentum:g}"
    ]
    if k < asked:
        lines.append(
            f"instdisc.num_negatives={asked} capped to {k} (the {n} training examples minus one)"
        )
    return lines


METHOD = base.register(
    base.Method(
        name="instdisc",
        train_step=train_step,
        summary="InstDisc: NCE/InfoNCE of each example against its memory-bank row and K others",
        config_defaults=config_defaults,
        validate=validate,
        init_state=init_state,
        resolve=resolve,
        state_sharding=state_sharding,
        needs_index=True,
    )
)
