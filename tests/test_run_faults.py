"""Faults a long run meets: a full disk during a checkpoint save."""

import os
import subprocess
import uuid

import jax
import numpy as np
import pytest
from tiny import loop_config, model_and_optimizer

from simclr_jax import checkpoint, modes
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import loop, parallel


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (root can mount one; CI runs as root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the development machines run as root)")
    path = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_save_into_a_full_disk_stops_the_run_and_keeps_the_older_checkpoints(
    small_disk, monkeypatch
):
    workdir = str(small_disk / "run")
    filler = small_disk / "users_other_file.bin"
    real_save = loop._save

    def save_then_fill(r, step, state):
        if step == 12:  # the disk fills up after the step-6 checkpoint is on it
            r.manager.wait_until_finished()
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * (free - 4096))
        real_save(r, step, state)

    monkeypatch.setattr(loop, "_save", save_then_fill)
    with pytest.raises(checkpoint.CheckpointError) as e:
        modes.pretrain(loop_config(total_steps=12), workdir)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg, msg
    assert checkpoint.checkpoint_dir(workdir) in msg
    assert filler.exists()  # nothing of the user's is deleted to make room
    filler.unlink()
    steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(workdir)) if s.isdigit())
    assert steps == [6]
    config = loop_config(total_steps=12)
    model, tx, _ = model_and_optimizer(config)
    mesh = parallel.make_mesh()
    abstract = pretrain_state.abstract_train_state(config, model, tx, mesh)
    manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
    try:
        state, meta, step = checkpoint.restore_latest(manager, abstract, workdir)
    finally:
        manager.close()
    assert step == 6 and meta["data_step"] == 6 and int(state.step) == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
