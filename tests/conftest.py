"""Test set-up: 8 virtual CPU devices and the fast CPU convolution path, before JAX starts."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_experimental_ynn_fusion_type=dot",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# PyTorch's triton segfaults when it loads after TensorFlow in one process (both bundle LLVM);
# loading it first is safe. The torch export tests need it, and earlier tests load TensorFlow.
try:
    import torch  # noqa: F401, E402
    import torchvision.ops  # noqa: F401, E402
except ImportError:  # the export tests fail with an install hint instead
    pass
