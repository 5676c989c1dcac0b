"""The command line: bad input exits with one clear line, never a traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.tempersture=0.1"], 'Did you mean "temperature"'),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
        (["--config.temperature=-1"], "config.temperature=-1.0 is invalid: > 0"),
        (["--config.model.depth=19"], "config.model.depth=19 is invalid"),
        (["--mode=train"], "--mode=train"),
        (
            ["--config.dataset=cifar100", "--config.data.data_dir=/nonexistent"],
            "tfds build cifar100",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclr_jax.main",
            f"--config={REPO}/configs/digits.py",
            f"--workdir={tmp_path / 'w'}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
