"""How runs compile their initialisers: one place for the XLA options every job shares."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

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


# Process-wide memo of built (jitted) functions: runs with the same model and settings in one
# process (the random-init and pretrained evaluations, a resumed run) share one compilation.
_CACHE: dict[Any, tuple[Any, list[Any]]] = {}
_MAX_ENTRIES = 128
# Arrays up to this many elements enter a key by value (a schedule's constants, a zero init);
# larger ones by identity, pinned so their id cannot be reused while the entry lives.
_ARRAY_BY_VALUE_MAX = 1 << 16


def _fingerprint(obj: Any, pins: list[Any], seen: set[int]) -> Any:
    """A hashable key equal for inputs that build the same function, by value where it can be."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return (type(obj).__name__, obj)
    if id(obj) in seen:  # a recursive closure: the outer level already names it
        return ("cycle",)
    seen = seen | {id(obj)}
    if isinstance(obj, ml_collections.ConfigDict):
        return ("config", obj.to_json_best_effort(sort_keys=True))
    if isinstance(obj, functools.partial):
        parts = (obj.func, obj.args, obj.keywords)
        return ("partial", *(_fingerprint(p, pins, seen) for p in parts))
    if inspect.isfunction(obj):
        cells = tuple(c.cell_contents for c in obj.__closure__ or ())
        return (
            "function",
            obj.__module__,
            obj.__qualname__,
            obj.__code__,
            _fingerprint((obj.__defaults__, obj.__kwdefaults__, cells), pins, seen),
        )
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        return ("dict", tuple((repr(k), _fingerprint(v, pins, seen)) for k, v in items))
    if isinstance(obj, (tuple, list)):  # namedtuples (optax transforms) too
        return (type(obj).__qualname__, tuple(_fingerprint(v, pins, seen) for v in obj))
    if isinstance(obj, (np.ndarray, jax.Array)) and obj.size <= _ARRAY_BY_VALUE_MAX:
        data = np.asarray(jax.device_get(obj))
        digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
        return ("array", data.shape, str(data.dtype), digest)
    try:
        hash(obj)  # flax modules and meshes compare by value; jitted functions by identity
    except TypeError:
        pins.append(obj)
        return ("id", id(obj))
    return ("hashable", obj)


def cached(make: Callable[[], Any]) -> Any:
    """`make()` built once per process for everything `make` closes over (e.g. a jitted step).

    The key is derived from `make` itself: its code and, recursively, every value it captures
    (closures, defaults, partials, config sections, small arrays by value). No hand-written key
    can forget an input, so a changed model, optimizer or setting always builds afresh.
    """
    pins: list[Any] = []
    key = _fingerprint(make, pins, set())
    if key not in _CACHE:
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.clear()
        _CACHE[key] = (make(), pins)
    return _CACHE[key][0]
