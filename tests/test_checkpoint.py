"""Checkpoints: kill-and-resume equality, resharding, corruption fallback, config guard."""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils
from tiny import loop_config, model_and_optimizer, tiny_config

from simclr_jax import checkpoint, config_base, modes
from simclr_jax.pretrain import state as pretrain_state
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
        # The preemption handler saved a checkpoint at the step it stopped and exited with the
        # status that tells a scheduler or retry loop to resume it.
        from simclr_jax import modes

        assert proc.returncode == modes.PREEMPTED_EXIT_STATUS == 75, out
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
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    # One jit keeps each leaf's sharding; the arithmetic stays in each leaf's dtype.
    return jax.jit(lambda t: jax.tree.map(lambda x: x * 3 + 1 + (x != 0), t))(state)


def test_restore_onto_fewer_devices(tmp_path):
    config = tiny_config()
    state8 = _filled_state(config, *_parts(jax.devices(), config))
    manager = checkpoint.create_manager(str(tmp_path))
    checkpoint.save(manager, 3, state8, {"step": 3, "data_step": 3})
    manager.wait_until_finished()

    model, tx, mesh4 = _parts(jax.devices()[:4], config)
    abstract = pretrain_state.abstract_train_state(config, model, tx, mesh4)
    state4, meta, step = checkpoint.restore_latest(manager, abstract, str(tmp_path))
    manager.close()
    assert step == 3 and meta["data_step"] == 3
    assert int(state4.step) == 1
    leaf4 = jax.tree.leaves(state4.params)[0]
    assert len(leaf4.sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(state4), jax.tree.leaves(state8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def no_retry_pause(monkeypatch):
    """Retries of an unreadable checkpoint without the pause meant for a cloud bucket."""
    monkeypatch.setattr(checkpoint, "RESTORE_RETRY_DELAY_S", 0.0)


def _damage(step_dir, which):
    """Truncates every file of a saved state ('every_file'), or its largest array data file.

    Orbax reads the tree metadata (shapes, dtypes) from small entries; the largest data file
    holds array chunks only, so with 'array_data' the check passes and the restore itself fails.
    """
    state_dir = os.path.join(step_dir, "state")
    if which == "array_data":
        data = glob.glob(os.path.join(state_dir, "ocdbt.process_*", "d", "*"))
        paths = [max(data, key=os.path.getsize)]
    else:
        paths = [os.path.join(r, name) for r, _, names in os.walk(state_dir) for name in names]
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(3)


@pytest.mark.parametrize("which", ["every_file", "array_data"])
def test_unreadable_checkpoint_is_moved_aside_and_the_previous_restored(
    tmp_path, caplog, no_retry_pause, which
):
    config = tiny_config()
    model, tx, mesh = _parts(jax.devices(), config)
    state = _filled_state(config, model, tx, mesh)
    workdir = str(tmp_path)
    manager = checkpoint.create_manager(workdir, async_save=False)
    for step in (1, 2):
        checkpoint.save(manager, step, state, {"step": step, "data_step": step})
    manager.wait_until_finished()
    manager.close()
    _damage(os.path.join(checkpoint.checkpoint_dir(workdir), "2"), which)
    if which == "array_data":  # the metadata still reads: the restore fails, not the check
        ocp.StandardCheckpointHandler().metadata(manager.directory / "2" / "state")
    user_file = os.path.join(workdir, "notes.txt")
    open(user_file, "w").write("mine")

    abstract = pretrain_state.abstract_train_state(config, model, tx, mesh)
    manager = checkpoint.create_manager(workdir)  # a resumed run's fresh manager
    restored, meta, step = checkpoint.restore_latest(manager, abstract, workdir)
    manager.close()
    assert step == 1 and meta["step"] == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    attempts = [r.message for r in caplog.records if "cannot be read (attempt" in r.message]
    assert len(attempts) == checkpoint.RESTORE_ATTEMPTS and "/2 " in attempts[0]
    assert any("cannot be restored" in r.message and "/2" in r.message for r in caplog.records)
    moved = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    assert len(moved) == 1 and moved[0].startswith("2-")
    assert os.listdir(checkpoint.checkpoint_dir(workdir)) == ["1"]
    assert open(user_file).read() == "mine"


def _saved_zeros(tmp_path, abstract, steps):
    """A workdir with checkpoints at `steps` of a zero state shaped as `abstract` (no init run)."""
    state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), abstract)
    workdir = str(tmp_path)
    manager = checkpoint.create_manager(workdir, async_save=False)
    for step in steps:
        checkpoint.save(manager, step, state, {"step": step, "data_step": step})
    manager.wait_until_finished()
    manager.close()
    return workdir


def test_transient_read_error_is_retried_and_nothing_moved(
    tmp_path, monkeypatch, caplog, no_retry_pause
):
    config = tiny_config()
    model, tx, mesh = _parts(jax.devices(), config)
    abstract = pretrain_state.abstract_train_state(config, model, tx, mesh)
    workdir = _saved_zeros(tmp_path, abstract, steps=(1, 2))
    read_step, calls = checkpoint._read_step, []

    def flaky_read(manager, step, abstract_state):
        calls.append(step)
        if len(calls) == 1:
            raise OSError("simulated: connection reset by the bucket")
        return read_step(manager, step, abstract_state)

    monkeypatch.setattr(checkpoint, "_read_step", flaky_read)
    manager = checkpoint.create_manager(workdir)
    _, meta, step = checkpoint.restore_latest(manager, abstract, workdir)
    manager.close()
    assert step == 2 and meta["step"] == 2 and calls == [2, 2]
    assert any(
        "attempt 1 of" in r.message and "connection reset" in r.message for r in caplog.records
    )
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["1", "2"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))


def _changed(abstract, change):
    """`abstract` with one head leaf missing ('missing') or one leaf more ('extra')."""
    if change == "missing":
        params = {**abstract.params, "head": dict(abstract.params["head"])}
        del params["head"]["dense2"]
        return abstract.replace(params=params)
    leaf = jax.tree.leaves(abstract.params)[0]
    queue = jax.ShapeDtypeStruct((8, 16), leaf.dtype, sharding=leaf.sharding)
    return abstract.replace(method_state={"queue": queue})


@pytest.mark.parametrize("change", ["head_out_dim", "missing", "extra"])
def test_checkpoint_of_another_state_is_refused_and_left_in_place(tmp_path, change):
    config = tiny_config()
    model, tx, mesh = _parts(jax.devices(), config)
    workdir = _saved_zeros(
        tmp_path, pretrain_state.abstract_train_state(config, model, tx, mesh), steps=(2, 4, 6)
    )
    if change == "head_out_dim":  # the measured case: --config.model.head_out_dim=32
        config.model.head_out_dim = 32
        model, tx, mesh = _parts(jax.devices(), config)
        abstract = pretrain_state.abstract_train_state(config, model, tx, mesh)
        want = r"params\.head\.\S+ saved \([\d, ]*16,?\) float32, expected \([\d, ]*32,?\) float32"
    else:
        abstract = _changed(pretrain_state.abstract_train_state(config, model, tx, mesh), change)
        want = {
            "missing": r"params\.head\.dense2\.kernel saved \(16, 16\) float32, not expected",
            "extra": r"method_state\.queue not saved, expected \(8, 16\) float32",
        }[change]
    manager = checkpoint.create_manager(workdir)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore_latest(manager, abstract, workdir)
    manager.close()
    message = str(e.value)
    assert "\n" not in message
    assert f"checkpoint {checkpoint.checkpoint_dir(workdir)}/6 holds a different state" in message
    assert re.search(want, message), message
    if change == "head_out_dim":  # 6 differing leaves: 3 named, the rest counted
        assert re.search(r"; and \d+ more\. ", message), message
    assert "another --workdir" in message and "No checkpoint was moved or deleted" in message
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir)), key=int) == ["2", "4", "6"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))


def test_processes_agree_before_a_checkpoint_moves(tmp_path, monkeypatch, caplog, no_retry_pause):
    # Process 0 reads checkpoint 2, another process cannot: both must skip it, and process 0
    # moves it only between two barriers that every process reaches.
    config = tiny_config()
    model, tx, mesh = _parts(jax.devices(), config)
    abstract = pretrain_state.abstract_train_state(config, model, tx, mesh)
    workdir = _saved_zeros(tmp_path, abstract, steps=(1, 2))
    newest = os.path.join(checkpoint.checkpoint_dir(workdir), "2")

    def other_process_cannot_read_2(outcome):
        return max(outcome, checkpoint._UNREADABLE) if os.path.exists(newest) else outcome

    barriers = []
    monkeypatch.setattr(checkpoint, "_worst_on_any_process", other_process_cannot_read_2)
    monkeypatch.setattr(
        checkpoint, "_barrier", lambda name: barriers.append((name, os.path.exists(newest)))
    )
    manager = checkpoint.create_manager(workdir)
    _, _, step = checkpoint.restore_latest(manager, abstract, workdir)
    manager.close()
    assert step == 1
    # Folder 2 was still in place at the first barrier and gone at the second.
    assert [exists for _, exists in barriers] == [True, False], barriers
    assert all("quarantine_2" in name for name, _ in barriers)
    attempts = [r.message for r in caplog.records if "cannot be read (attempt" in r.message]
    assert len(attempts) == checkpoint.RESTORE_ATTEMPTS
    assert all("another process cannot read it" in m for m in attempts)


# One of two processes (2 CPU devices each) of a real multi-host run: saves a row-sharded state
# at steps 1 and 2, process 1 damages its own array file of step 2 (so only it fails to read),
# then both restore and save step 7 (orbax's own barriers must still pair up).
TWO_PROCESS_WORKER = """
import glob, os, sys
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from simclr_jax import checkpoint
checkpoint.RESTORE_RETRY_DELAY_S = 0.0
mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ("data",))
abstract = {
    "bank": jax.ShapeDtypeStruct((64, 256), np.float32, sharding=NamedSharding(mesh, P("data"))),
    "w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh, P())),
}
values = {k: np.random.default_rng(0).random(s.shape, np.float32) for k, s in abstract.items()}
state = {k: jax.make_array_from_callback(s.shape, s.sharding, values[k].__getitem__)
         for k, s in abstract.items()}
manager = checkpoint.create_manager(workdir, async_save=False)
for step in (1, 2):
    checkpoint.save(manager, step, state, {"step": step, "data_step": step})
manager.wait_until_finished()
manager.close()
multihost_utils.sync_global_devices("saved")
if pid == 1:
    data = glob.glob(os.path.join(workdir, "checkpoints/2/state/ocdbt.process_1/d/*"))
    open(max(data, key=os.path.getsize), "r+b").truncate(3)
multihost_utils.sync_global_devices("damaged")
manager = checkpoint.create_manager(workdir)
restored, meta, step = checkpoint.restore_latest(manager, abstract, workdir)
for k, v in restored.items():
    for shard in v.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), values[k][shard.index])
checkpoint.save(manager, 7, restored, {"step": 7, "data_step": 7})
manager.wait_until_finished()
manager.close()
multihost_utils.sync_global_devices("done")
print(f"RESULT process {pid} restored step {step}")
"""


def test_two_processes_skip_a_checkpoint_only_one_can_read(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_WORKER, str(pid), str(port), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for pid in (0, 1)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:  # a process stuck in a collective must not outlive the test
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    for pid, (proc, out) in enumerate(zip(procs, outs, strict=True)):
        assert proc.returncode == 0 and f"RESULT process {pid} restored step 1" in out, out[-3000:]
    # Process 1 could not read step 2 and process 0 could; both skipped it, and it moved once.
    assert "another process cannot read it" in outs[0], outs[0][-3000:]
    assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == ["1", "7"]
    moved = os.listdir(os.path.join(tmp_path, "checkpoints_unreadable"))
    assert len(moved) == 1 and moved[0].startswith("2-")


def test_collectives_run_only_with_several_processes(monkeypatch):
    synced = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", synced.append)
    monkeypatch.setattr(
        multihost_utils, "process_allgather", lambda x: np.array([x, checkpoint._MISMATCH])
    )
    checkpoint._barrier("one")
    assert checkpoint._worst_on_any_process(checkpoint._OK) == checkpoint._OK and synced == []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    checkpoint._barrier("two")
    assert checkpoint._worst_on_any_process(checkpoint._OK) == checkpoint._MISMATCH
    assert synced == ["two"]


def test_changed_config_refuses_to_resume(tmp_path):
    workdir = str(tmp_path)
    modes.pretrain(loop_config(), workdir)
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "12"))  # resume from 6
    # The seed is no constant of the compiled step: every run here is test_step_hygiene's program.
    changed = loop_config()
    changed.seed = 1
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        modes.pretrain(changed, workdir)
    # Allowed explicitly: it resumes from step 6 and runs to 12, keeping the old config aside.
    out = modes.pretrain(changed, workdir, allow_config_change=True)
    assert int(out["state"].step) == 12
    assert len([f for f in os.listdir(workdir) if f.startswith("config.")]) == 2


def test_config_diff_reads_keys_a_saved_run_predates_as_their_defaults():
    new = tiny_config("imagenet").to_dict()
    saved = tiny_config("imagenet").to_dict()
    del saved["data"]["host_size"]  # a run saved before the key existed
    assert config_base.config_diff(saved, new) == ["data.host_size: 0 -> 256"]
    new["data"]["host_size"] = 0  # the behaviour that run had
    assert config_base.config_diff(saved, new) == []
