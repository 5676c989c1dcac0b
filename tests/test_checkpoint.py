"""Checkpoints: kill-and-resume equality, resharding, corruption fallback, config guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny import loop_config, model_and_optimizer, tiny_config

from simclr_jax import checkpoint, config_base
from simclr_jax.pretrain import train
from simclr_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny run as command-line overrides, so a subprocess can be killed mid-run.
TINY_FLAGS = [
    "--config.batch_size=32",
    "--config.data.image_size=8",
    "--config.augment.image_size=8",
    "--config.model.base_width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.head_out_dim=16",
    "--config.optim.warmup_epochs=1",
    "--config.eval.at_end=False",
    "--config.log_every_steps=5",
    "--config.checkpoint_every_steps=10",
    "--config.keep_checkpoints=2",
]


def _main(workdir, total_steps, extra=()):
    """Starts `python -m simclr_jax.main` on the tiny digits run; returns the Popen."""
    cmd = [
        sys.executable,
        "-m",
        "simclr_jax.main",
        f"--config={REPO}/configs/digits.py",
        f"--workdir={workdir}",
        f"--config.total_steps={total_steps}",
        *TINY_FLAGS,
        *extra,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path, proc, timeout=120.0):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def _final_variables(workdir):
    variables, meta = checkpoint.load_export(os.path.join(workdir, "export"))
    return jax.tree.leaves(variables), meta


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    proc = _main(workdir, 60)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return _final_variables(workdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, uninterrupted, sig):
    workdir = str(tmp_path / "run")
    proc = _main(workdir, 60)
    _wait_for(os.path.join(workdir, "checkpoints", "10"), proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        # The preemption handler saved a checkpoint at the step it stopped and exited cleanly.
        assert proc.returncode == 0, out
        assert "preemption" in out
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    steps = sorted(int(s) for s in names if s.isdigit())
    assert steps and steps[-1] < 60
    assert not os.path.exists(os.path.join(workdir, "export"))

    proc = _main(workdir, 60)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"resumed from step {steps[-1]}" in out
    got, meta = _final_variables(workdir)
    want, _ = uninterrupted
    assert meta["source"]["step"] == 60
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)  # bit-exact on CPU
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert rows[-1]["step"] == 60


def _parts(devices, config):
    """(model, tx, mesh) of the tiny run on `devices`."""
    model, tx, _ = model_and_optimizer(config)
    return model, tx, parallel.make_mesh(devices)


def _filled_state(config, model, tx, mesh):
    """The initial state with every leaf moved off its initial value (step 0 -> 1).

    It stands in for a trained state (moments, batch statistics, step and key all changed)
    without compiling a train step for it.
    """
    state = train.create_train_state(config, model, tx, mesh)
    # One jit keeps each leaf's sharding; the arithmetic stays in each leaf's dtype.
    return jax.jit(lambda t: jax.tree.map(lambda x: x * 3 + 1 + (x != 0), t))(state)


def test_restore_onto_fewer_devices(tmp_path):
    config = tiny_config()
    state8 = _filled_state(config, *_parts(jax.devices(), config))
    manager = checkpoint.create_manager(str(tmp_path))
    checkpoint.save(manager, 3, state8, {"step": 3, "data_step": 3})
    manager.wait_until_finished()

    model, tx, mesh4 = _parts(jax.devices()[:4], config)
    abstract = train.abstract_train_state(config, model, tx, mesh4)
    state4, meta, step = checkpoint.restore_latest(manager, abstract, str(tmp_path))
    manager.close()
    assert step == 3 and meta["data_step"] == 3
    assert int(state4.step) == 1
    leaf4 = jax.tree.leaves(state4.params)[0]
    assert len(leaf4.sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(state4), jax.tree.leaves(state8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, caplog):
    config = tiny_config()
    model, tx, mesh = _parts(jax.devices(), config)
    state = _filled_state(config, model, tx, mesh)
    workdir = str(tmp_path)
    manager = checkpoint.create_manager(workdir, async_save=False)
    for step in (1, 2):
        checkpoint.save(manager, step, state, {"step": step, "data_step": step})
    manager.wait_until_finished()
    # Truncate every data file of the newest checkpoint's state.
    newest = os.path.join(checkpoint.checkpoint_dir(workdir), "2", "state")
    for root, _, files in os.walk(newest):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    user_file = os.path.join(workdir, "notes.txt")
    open(user_file, "w").write("mine")

    abstract = train.abstract_train_state(config, model, tx, mesh)
    _, meta, step = checkpoint.restore_latest(manager, abstract, workdir)
    manager.close()
    assert step == 1 and meta["step"] == 1
    assert any("cannot be restored" in r.message and "/2" in r.message for r in caplog.records)
    moved = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    assert len(moved) == 1 and moved[0].startswith("2-")
    assert open(user_file).read() == "mine"


def test_changed_config_refuses_to_resume(tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(loop_config(), workdir)
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "12"))  # resume from 6
    # The seed is no constant of the compiled step: every run here is test_step_hygiene's program.
    changed = loop_config()
    changed.seed = 1
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        train.train_and_evaluate(changed, workdir)
    # Allowed explicitly: it resumes from step 6 and runs to 12, keeping the old config aside.
    out = train.train_and_evaluate(changed, workdir, allow_config_change=True)
    assert int(out["state"].step) == 12
    assert len([f for f in os.listdir(workdir) if f.startswith("config.")]) == 2


def test_config_diff_reads_keys_a_saved_run_predates_as_their_defaults():
    new = tiny_config("imagenet").to_dict()
    saved = tiny_config("imagenet").to_dict()
    del saved["data"]["host_size"]  # a run saved before the key existed
    assert config_base.config_diff(saved, new) == ["data.host_size: 0 -> 256"]
    new["data"]["host_size"] = 0  # the behaviour that run had
    assert config_base.config_diff(saved, new) == []
