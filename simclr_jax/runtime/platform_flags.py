"""XLA:CPU settings that must be made before JAX starts its backend (CPU step speed)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

# On XLA:CPU the backward of 3x3 convolutions is several times faster with YNNPACK dot fusion
# (gradients agree to ~2e-6), and YNNPACK's reductions take 7-25% (by CPU) off the digits step:
# BatchNorm's statistics, which XLA otherwise sums as latency-bound reduce-window trees, with
# 1.1-10x less rounding error against float64 than those trees (docs/benchmarks_history.md).
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def accelerator_installed() -> bool:
    """True when a GPU/TPU plugin for JAX is importable (then CPU flags are left alone)."""
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def set_cpu_flags() -> None:
    """CPU-only installs, unless SIMCLR_NO_CPU_FLAGS=1: appends the XLA:CPU flags to XLA_FLAGS,
    runs single-device steps in the calling thread and keeps freed memory in the process.

    The last two change no number, only where a step's scratch memory comes from. An
    asynchronous step runs on a worker thread, whose glibc arena hands its ~200 MB scratch
    buffer (the digits default) back to the kernel after every step, so every step faulted
    ~47k fresh zeroed pages: a fifth of its time (docs/benchmarks_history.md). Run in the caller's
    thread, the buffer comes from the main heap, which with mmap off and trimming raised is
    reused from step to step. Sharded steps (several devices) always dispatch asynchronously.
    """
    if os.environ.get("SIMCLR_NO_CPU_FLAGS") == "1" or accelerator_installed():
        return
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    import jax  # after XLA_FLAGS: importing JAX does not start its backend

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """glibc only: serves large allocations from the heap and never trims it; False elsewhere.

    Without this, every allocation above 32 MB is a fresh mmap whose pages the kernel faults
    in and zeroes on first touch, on every step.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False
