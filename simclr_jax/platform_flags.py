"""XLA flags that must be set before JAX starts its backend (CPU convolution speed)."""

from __future__ import annotations

import importlib.util
import os

# On XLA:CPU the backward of 3x3 convolutions is several times faster with YNNPACK dot fusion
# (measured in docs/benchmarks.md; gradients agree to ~2e-6). Adding `reduce` takes ~7% off the
# digits step but moves the digits default's result (docs/benchmarks.md), so it is opt-in.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def accelerator_installed() -> bool:
    """True when a GPU/TPU plugin for JAX is importable (then CPU flags are left alone)."""
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def set_cpu_flags() -> None:
    """Appends the CPU flags to XLA_FLAGS on CPU-only installs, unless SIMCLR_NO_CPU_FLAGS=1."""
    if os.environ.get("SIMCLR_NO_CPU_FLAGS") == "1" or accelerator_installed():
        return
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
