"""One run per workdir: a live run refuses a second one, a dead holder's lock is taken over."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import checkpoint
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


STEPS = 6
TINY_RUN = [
    f"--config={REPO}/configs/digits.py",
    f"--config.total_steps={STEPS}",
    "--config.batch_size=32",
    "--config.data.image_size=8",
    "--config.augment.image_size=8",
    "--config.model.base_width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.head_out_dim=16",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.eval.at_end=False",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    # Unoptimised XLA compiles the tiny ResNet in a fifth of the time.
    return {
        **env,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO,
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    }


def _wait_for(condition, proc, what, timeout=240):
    """Polls `condition()` until it holds; fails if `proc` ends first or `timeout` passes."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended before {what} (status {proc.returncode})")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.2)


def _restore_all(workdir):
    """Every saved step's train state as numpy arrays (no devices involved): {step: tree}."""
    root = checkpoint.checkpoint_dir(str(workdir))
    ckptr, states = ocp.PyTreeCheckpointer(), {}
    for step in sorted(int(d) for d in os.listdir(root) if d.isdigit()):
        path = os.path.join(root, str(step), "state")
        tree = ckptr.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        states[step] = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return states


def test_a_second_run_is_refused_while_the_first_trains_and_the_first_finishes(tmp_path):
    """Two real pretraining runs on one workdir: the second is refused, the first unharmed."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "simclr_jax.main", *TINY_RUN, f"--workdir={workdir}"]
    log = open(tmp_path / "first.log", "w+")  # a file, not a pipe nobody reads while it runs
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    stopped = False
    try:
        lock = workdir / workdir_lock.LOCK_NAME
        _wait_for(lambda: f'"pid": {first.pid}' in _text(lock), first, "its lock")
        _wait_for(lambda: _text(workdir / "metrics.jsonl"), first, "its first logged step")
        # Paused mid-run (lock held, training under way) so that the second run meets it live
        # however slowly either starts on a loaded machine.
        first.send_signal(signal.SIGSTOP)
        stopped = True
        before = sorted(os.listdir(workdir))
        second = subprocess.run(
            cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240
        )
        assert sorted(os.listdir(workdir)) == before  # the second wrote and removed nothing
        first.send_signal(signal.SIGCONT)
        stopped = False
        first.wait(timeout=240)
    finally:
        if stopped:
            first.send_signal(signal.SIGCONT)
        if first.poll() is None:
            first.kill()
            first.wait()
        log.seek(0)
        out = log.read()
        log.close()
    assert second.returncode == 1, second.stderr[-4000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"PID {first.pid}" in last and "in use" in last, last
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, out[-4000:]
    # The first run's whole checkpoint set restores, every array finite.
    states = _restore_all(workdir)
    assert sorted(states) == list(range(2, STEPS + 1, 2))
    for state in states.values():
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
    assert open(workdir / workdir_lock.LOCK_NAME).read() == ""  # released at the end


def _text(path) -> str:
    try:
        return open(path).read()
    except FileNotFoundError:
        return ""
