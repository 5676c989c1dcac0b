"""How runs compile their initialisers: one place for the XLA options every job shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

# XLA:CPU compiles a ResNet's initialisation (one threefry draw and truncated-normal transform per
# kernel) in 11-14 s at its default LLVM -O3 and in 2-3 s at -O2, with the same bits: the draws are
# integer arithmetic and the transforms elementwise, so only the loop scheduling changes (-O0
# rounds differently). tests/test_train.py checks the bits on the tiny model.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def jit_init(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` for initialisers: compiled at -O2 on CPU (same bits, faster)."""
    if jax.default_backend() == "cpu":
        jit_kwargs = {"compiler_options": CPU_INIT_COMPILER_OPTIONS, **jit_kwargs}
    return jax.jit(fn, **jit_kwargs)
