"""Optimizers from optax: LARS with bias/BN masks, SGD and AdamW; warmup + cosine schedules."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")


def decay_mask(params: Any) -> Any:
    """True for conv/dense kernels; False for biases and BatchNorm scales/biases.

    The same mask drives weight decay and LARS trust-ratio adaptation: optax.lars applies both
    to every leaf unless masked.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: getattr(path[-1], "key", None) == "kernel" and leaf.ndim > 1, params
    )


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """Peak LR: `base * B / 256` (linear), `base * sqrt(B)` (sqrt) or `base` (none)."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling={scaling!r} is not one of {LR_SCALINGS}")


def total_train_steps(config: Any, steps_per_epoch: int) -> int:
    """`config.total_steps` when > 0, else `config.num_epochs * steps_per_epoch`."""
    if config.total_steps > 0:
        return int(config.total_steps)
    steps = int(round(config.num_epochs * steps_per_epoch))
    if steps <= 0:
        raise ValueError(
            f"num_epochs={config.num_epochs!r} x steps_per_epoch={steps_per_epoch} gives no steps; "
            "set --config.total_steps or --config.num_epochs > 0"
        )
    return steps


def warmup_steps(config: Any, steps_per_epoch: int, total_steps: int) -> int:
    """Warmup length in steps from `optim.warmup_epochs`, capped at the run's length."""
    return min(int(round(config.optim.warmup_epochs * steps_per_epoch)), total_steps)


def make_schedule(config: Any, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 to the scaled peak LR, then cosine decay to 0 at the last step."""
    oc = config.optim
    peak = scaled_learning_rate(oc.base_lr, config.batch_size, oc.lr_scaling)
    total = total_train_steps(config, steps_per_epoch)
    warmup = warmup_steps(config, steps_per_epoch, total)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),
        end_value=0.0,
    )


def _optimizer(oc: Any, lr: Any, mask: Any) -> optax.GradientTransformation:
    """`oc.name`'s optax transformation at learning rate (or schedule) `lr`, masks `mask`."""
    if oc.name == "lars":
        return optax.lars(
            lr,
            weight_decay=oc.weight_decay,
            weight_decay_mask=mask,
            trust_coefficient=oc.trust_coefficient,
            trust_ratio_mask=mask,
            momentum=oc.momentum,
        )
    if oc.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(oc.weight_decay, mask=mask),
            optax.sgd(lr, momentum=oc.momentum, nesterov=True),
        )
    if oc.name == "adamw":
        return optax.adamw(lr, weight_decay=oc.weight_decay, mask=mask)
    raise ValueError(f"optim.name={oc.name!r} is not one of {OPTIMIZERS}")


def freeze(
    tx: optax.GradientTransformation, params: Any, frozen: Sequence[Sequence[str]]
) -> optax.GradientTransformation:
    """`tx` on every param except the subtrees at the `frozen` key paths, which never change.

    A frozen subtree gets a zero update (no gradient step, no weight decay) and no optimizer
    state, so its params stay bit-identical (MoCo v3's frozen random patch projection).
    """
    frozen = [tuple(p) for p in frozen]
    for path in frozen:
        node = params
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                have = sorted(node) if isinstance(node, Mapping) else []
                raise ValueError(f"frozen params {'/'.join(path)}: no {k!r} among {have}")
            node = node[k]

    def label(path: Any, _: Any) -> str:
        keys = tuple(getattr(p, "key", None) for p in path)
        return "frozen" if any(keys[: len(f)] == f for f in frozen) else "trained"

    return optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        lambda p: jax.tree_util.tree_map_with_path(label, p),
    )


def make_optimizer(
    config: Any, params: Any, steps_per_epoch: int, frozen: Sequence[Sequence[str]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds `(optimizer, lr_schedule)` from `config.optim` for the given param tree.

    LARS excludes biases and BatchNorm parameters from weight decay and trust-ratio adaptation.
    The top-level modules named in `optim.constant_lr_params` (SimSiam's predictor) train at
    the peak LR throughout instead of following the schedule. The subtrees at the key paths in
    `frozen` (a method's, e.g. `('encoder', 'embedding')`) never change (`freeze`).
    """
    oc = config.optim
    schedule = make_schedule(config, steps_per_epoch)
    constant = tuple(oc.constant_lr_params)
    unknown = sorted(set(constant) - set(params))
    if unknown:
        raise ValueError(
            f"optim.constant_lr_params={constant!r} names {unknown}, not among the model's "
            f"top-level modules {sorted(params)}"
        )
    if not constant:
        # Under `freeze` the optimizer sees the trained subtree only: the mask is computed on it.
        tx = _optimizer(oc, schedule, decay_mask if frozen else decay_mask(params))
    else:
        peak = scaled_learning_rate(oc.base_lr, config.batch_size, oc.lr_scaling)
        labels = {k: "constant" if k in constant else "scheduled" for k in params}
        tx = optax.multi_transform(
            {
                "scheduled": _optimizer(oc, schedule, decay_mask),
                "constant": _optimizer(oc, peak, decay_mask),
            },
            lambda p: jax.tree_util.tree_map_with_path(lambda path, _: labels[path[0].key], p),
        )
    if oc.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip_norm), tx)
    if frozen:  # outermost: clipping and the optimizer see the trained params only
        tx = freeze(tx, params, frozen)
    return tx, schedule
