"""`platform_flags.set_cpu_flags`: XLA:CPU flags, inline single-device steps, kept freed memory."""

import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "from simclr_jax import platform_flags as p; p.set_cpu_flags(); import os, jax; "
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
    assert "--xla_cpu_experimental_ynn_fusion_type=dot" in xla_flags.split()
    assert async_dispatch == "False"
    xla_flags, async_dispatch = _probe(SIMCLR_NO_CPU_FLAGS="1")
    assert xla_flags == "" and async_dispatch == "True"
    # A flag the user set is kept and not repeated.
    xla_flags, _ = _probe(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot,reduce")
    assert xla_flags.split() == ["--xla_cpu_experimental_ynn_fusion_type=dot,reduce"]


def test_keep_freed_memory_where_glibc_is():
    code = "from simclr_jax import platform_flags as p; print(p.keep_freed_memory())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    )
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.stdout.strip() == str(glibc)
