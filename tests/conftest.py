"""Test set-up: 8 virtual CPU devices and the fast CPU convolution path, before JAX starts."""

import atexit
import os
import shutil
import tempfile

from simclr_jax.runtime.platform_flags import CPU_FLAGS  # imports no JAX

# The CPU flags of every run (simclr_jax.main sets them), so the tests check the numbers users get.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", *CPU_FLAGS]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its subprocesses included (CLI and
# multi-process tests): the tiny models' identical steps compile once, not once per test. Keyed
# by the HLO, JAX version and flags, so a hit runs the same executable a compile would give.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="simclr_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# PyTorch's triton segfaults when it loads after TensorFlow in one process (both bundle LLVM);
# loading it first is safe. The torch export tests need it, and earlier tests load TensorFlow.
try:
    import torch  # noqa: F401, E402
    import torchvision.ops  # noqa: F401, E402
except ImportError:  # the export tests fail with an install hint instead
    pass
