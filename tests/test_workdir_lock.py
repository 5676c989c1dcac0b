"""One run per workdir: a live holder refuses others, a dead one's lock is taken over."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from simclr_jax.runtime import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = (
    "import sys, time\n"
    "from simclr_jax.runtime.workdir_lock import WorkdirLock\n"
    "lock = WorkdirLock(sys.argv[1], 'pretrain').acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def _holder(workdir):
    """A process that holds `workdir`'s lock until killed (as a live run does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_in_the_same_workdir_is_refused_and_released(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path), "pretrain"):
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"PID {os.getpid()}"):
            workdir_lock.WorkdirLock(str(tmp_path), "finetune").acquire()
    # Released: free again, and the file no longer names anyone.
    with workdir_lock.WorkdirLock(str(tmp_path), "finetune"):
        pass
    assert open(tmp_path / workdir_lock.LOCK_NAME).read() == ""


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirLockedError) as e:
            workdir_lock.WorkdirLock(str(tmp_path), "linear_eval").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"PID {proc.pid}" in msg and "--mode=pretrain" in msg
    finally:
        proc.kill()
        proc.wait()
    held = json.loads(open(tmp_path / workdir_lock.LOCK_NAME).read())
    assert held["pid"] == proc.pid  # SIGKILL left the file: stale, but no longer locked
    with caplog.at_level(logging.WARNING):
        with workdir_lock.WorkdirLock(str(tmp_path), "pretrain"):
            now = json.loads(open(tmp_path / workdir_lock.LOCK_NAME).read())
            assert now["pid"] == os.getpid()
    assert f"PID {proc.pid}" in caplog.text and "no longer running" in caplog.text


def test_the_command_line_refuses_a_locked_workdir_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    proc = _holder(workdir)
    try:
        t0 = time.time()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "simclr_jax.main",
                f"--config={REPO}/configs/digits.py",
                f"--workdir={workdir}",
                "--mode=export",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"PID {proc.pid}" in last and "in use" in last, last
    assert "Traceback" not in out.stderr
    assert time.time() - t0 < 120
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]  # nothing else was written
