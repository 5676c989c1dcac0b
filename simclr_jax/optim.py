"""Optimizers from optax: LARS with bias/BN masks, SGD and AdamW; warmup + cosine schedules."""

from __future__ import annotations

import math
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


def make_optimizer(
    config: Any, params: Any, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds `(optimizer, lr_schedule)` from `config.optim` for the given param tree.

    LARS excludes biases and BatchNorm parameters from weight decay and trust-ratio adaptation.
    """
    oc = config.optim
    schedule = make_schedule(config, steps_per_epoch)
    mask = decay_mask(params)
    if oc.name == "lars":
        tx = optax.lars(
            schedule,
            weight_decay=oc.weight_decay,
            weight_decay_mask=mask,
            trust_coefficient=oc.trust_coefficient,
            trust_ratio_mask=mask,
            momentum=oc.momentum,
        )
    elif oc.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(oc.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=oc.momentum, nesterov=True),
        )
    elif oc.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=oc.weight_decay, mask=mask)
    else:
        raise ValueError(f"optim.name={oc.name!r} is not one of {OPTIMIZERS}")
    if oc.get("grad_clip_norm", 0.0) > 0:
        tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip_norm), tx)
    return tx, schedule
