"""`platform_flags.set_cpu_flags`: XLA:CPU flags, inline single-device steps, kept freed memory."""

import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "from simclr_jax.runtime import platform_flags as p; p.set_cpu_flags(); import os, jax; "
    "print('flags=' + os.environ.get('XLA_FLAGS', '')); "
    "print(jax.config.read('jax_cpu_enable_async_dispatch'))"
)


def _probe(**env: str) -> list[str]:
    """Runs set_cpu_flags in a fresh process (it sets process-wide state); returns its lines."""
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SIMCLR_NO_CPU_FLAGS")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**full, **env},
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    flags, async_dispatch = out.strip().splitlines()[-2:]
    return [flags.removeprefix("flags="), async_dispatch]


def test_set_cpu_flags_and_its_opt_out():
    xla_flags, async_dispatch = _probe()
    assert "--xla_cpu_experimental_ynn_fusion_type=dot,reduce" in xla_flags.split()
    assert async_dispatch == "False"
    xla_flags, async_dispatch = _probe(SIMCLR_NO_CPU_FLAGS="1")
    assert xla_flags == "" and async_dispatch == "True"
    # A flag the user set is kept and not repeated.
    xla_flags, _ = _probe(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot")
    assert xla_flags.split() == ["--xla_cpu_experimental_ynn_fusion_type=dot"]


def test_keep_freed_memory_where_glibc_is():
    code = "from simclr_jax.runtime import platform_flags as p; print(p.keep_freed_memory())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    )
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.stdout.strip() == str(glibc)


def test_batch_sums_under_the_cpu_flags_are_as_accurate_as_a_pairwise_sum():
    # conftest runs the suite under platform_flags.CPU_FLAGS: BatchNorm's batch sums (here the
    # digits default's largest, 131072 terms per channel) must keep a pairwise sum's error bound,
    # log2(n) roundings relative to sum |x| (XLA's tree: 2.7e-7, YNNPACK's: 3.5e-8, the bound
    # 1.0e-6; a serial fp32 sum of these x is 4.1e-6).
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = (np.random.default_rng(0).standard_normal((512, 16, 16, 16)) * 2 + 0.7).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: jnp.sum(v, (0, 1, 2)))(x), np.float64)
    x64 = x.astype(np.float64)
    rel = np.abs(got - x64.sum((0, 1, 2))) / np.abs(x64).sum((0, 1, 2))
    assert rel.max() <= np.log2(512 * 16 * 16) * np.finfo(np.float32).eps / 2
