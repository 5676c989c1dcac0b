"""Multi-host: 2 processes x 2 CPU devices equal 1 process x 4; per-host data; start-up failures.

The multi-process runs go through `launch/local_multiprocess.sh` (processes on 127.0.0.1, gloo
collectives), i.e. the real `python -m simclr_jax.main` with `jax.distributed`. Every child is
started in its own session and killed with its whole group on failure or timeout: no test can
leave processes behind or hang.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import tiny_config
from tolerances import fp32_rtol

from simclr_jax import checkpoint, data
from simclr_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")

# Contrastive training amplifies fp32 reduction-order noise after ~5 steps (see test_train.py),
# so runs are compared over 3 steps.
STEPS = 3
TINY_FLAGS = [
    f"--config={REPO}/configs/digits.py",
    f"--config.total_steps={STEPS}",
    "--config.batch_size=32",
    "--config.data.image_size=8",
    "--config.augment.image_size=8",
    "--config.model.base_width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.head_out_dim=16",
    "--config.optim.warmup_epochs=1",
    # LARS as the tests' tiny_config: Adam's first steps (g / |g|) would turn reduction-order
    # noise on near-zero gradients into whole LR-sized steps.
    "--config.optim.name=lars",
    "--config.optim.base_lr=1.0",
    "--config.optim.lr_scaling=linear",
    "--config.log_every_steps=1",
    f"--config.checkpoint_every_steps={STEPS}",
]
# The end-of-run evaluation on a slice of digits, in batches of 96 (the last one padded).
EVAL_FLAGS = ["--config.data.eval_max_examples=256", "--config.eval.batch_size=96"]
COMPARED_METRICS = (
    "loss",
    "contrastive_acc",
    "entropy",
    "grad_norm",
    "param_norm",
    "linear_loss",
    "lr",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    # Unoptimised XLA compiles the tiny ResNet's init and step in a fifth of the time; both
    # runs of a comparison use the same setting, so their numbers stay comparable.
    env = {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    return {**env, **extra}


def _start(cmd, env):
    # A new session: on failure the whole group (launcher, its processes, filters) is killed.
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc, timeout):
    """(returncode, output); kills the process group if it outlives `timeout` seconds."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} ran longer than {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_state(workdir):
    """The saved train state at the last step, as numpy arrays (no devices involved)."""
    path = os.path.join(checkpoint.checkpoint_dir(workdir), str(STEPS), "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run as 2 processes x 2 devices and as 1 process x 4 devices, in parallel."""
    root = tmp_path_factory.mktemp("multihost")
    multi_dir, single_dir = str(root / "multi"), str(root / "single")
    # The multi-process run also uses the blockwise loss with a chunk that does not divide the
    # 64 views: equal to the dense loss of the single-process run (tests/test_losses_blockwise).
    multi = _start(
        [
            "bash",
            LAUNCHER,
            "-n",
            "2",
            "-d",
            "2",
            "-t",
            "120",
            "--",
            *TINY_FLAGS,
            *EVAL_FLAGS,
            f"--workdir={multi_dir}",
            "--config.simclr.loss_impl=blockwise",
            "--config.simclr.loss_chunk_size=24",
        ],
        _env(),
    )
    single = _start(
        [
            sys.executable,
            "-m",
            "simclr_jax.main",
            *TINY_FLAGS,
            *EVAL_FLAGS,
            f"--workdir={single_dir}",
        ],
        _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    try:
        rc_m, out_m = _finish(multi, 300)
        rc_s, out_s = _finish(single, 300)
    finally:
        _kill_group(multi)
        _kill_group(single)
    assert rc_m == 0, out_m[-6000:]
    assert rc_s == 0, out_s[-6000:]
    return (multi_dir, out_m), (single_dir, out_s)


def test_two_processes_log_the_same_steps_as_one(runs):
    (multi_dir, out), (single_dir, _) = runs
    multi, single = _metrics(multi_dir), _metrics(single_dir)
    # Only process 0 writes metrics: one row per step, not one per process.
    assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    # The fp32 rounding of a step (tests/tolerances.py; the same arithmetic as tests/test_train.py):
    # sums over 2 views x 32 images x 8 x 8 positions, 59 reductions forward, as many backward.
    rtol = fp32_rtol(2 * 32 * 8 * 8, 2 * (3 * 19 + 2))
    for m, s in zip(multi, single, strict=True):
        for key in COMPARED_METRICS:
            np.testing.assert_allclose(
                m[key], s[key], rtol=rtol, atol=rtol, err_msg=f"{key} at step {m['step']}"
            )
    assert "process 0/2: 2 local of 4 global devices" in out
    assert "global batch 32 on 4 devices" in out


def test_two_processes_end_with_the_same_state_as_one(runs):
    (multi_dir, _), (single_dir, _) = runs
    multi, single = _final_state(multi_dir), _final_state(single_dir)
    flat_m = jax.tree_util.tree_flatten_with_path(multi)[0]
    flat_s = jax.tree_util.tree_flatten_with_path(single)[0]
    assert [p for p, _ in flat_m] == [p for p, _ in flat_s]
    # Params, BN statistics and the optimizer's momentum (built from the gradients).
    for (path, a), (_, b) in zip(flat_m, flat_s, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )
    exported, meta = checkpoint.load_export(os.path.join(multi_dir, "export"))
    assert meta["source"]["step"] == STEPS
    np.testing.assert_allclose(
        jax.tree.leaves(exported["params"]["encoder"])[0],
        jax.tree.leaves(single["params"]["encoder"])[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_two_processes_evaluate_like_one(runs):
    (multi_dir, _), (single_dir, _) = runs
    with open(os.path.join(multi_dir, "eval.json")) as f:
        multi = json.load(f)
    with open(os.path.join(single_dir, "eval.json")) as f:
        single = json.load(f)
    # Features agree to fp32 noise; a probe may at most flip one of the 256 test examples.
    for kind in ("linear", "knn"):
        for encoder in ("random_init", "pretrained"):
            assert abs(multi[kind][encoder] - single[kind][encoder]) <= 1 / 256, (multi, single)


def test_only_process_zero_reports(runs):
    (multi_dir, out), _ = runs
    lines = out.splitlines()
    assert any(line.startswith("[0] ") for line in lines)
    # Process 1 announces itself, then prints no progress bar and no info logs (gloo aside).
    ones = [line for line in lines if line.startswith("[1] ") and "process 1/2:" not in line]
    assert not [line for line in ones if "step/s" in line or line.startswith("[1] I")], ones
    # The evaluation table and the report line come once, from process 0.
    assert [line[:4] for line in lines if "random_init" in line] == ["[0] "]
    assert [line[:4] for line in lines if "run report:" in line] == ["[0] "]
    assert os.path.exists(os.path.join(multi_dir, "config.json"))
    assert sorted(os.listdir(checkpoint.checkpoint_dir(multi_dir))) == [str(STEPS)]
    leftovers = [n for n in os.listdir(multi_dir) if ".tmp-" in n or ".old-" in n]
    assert not leftovers, leftovers


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_are_disjoint_and_cover_the_global_batch(process_count):
    config = tiny_config(batch_size=32)
    for start in (0, 43, 44):  # 44 steps per epoch: the epoch boundary and the next epoch
        whole = next(
            data.pretrain_iterator(config, process_index=0, process_count=1, start_step=start)
        )
        parts = [
            next(
                data.pretrain_iterator(
                    config, process_index=p, process_count=process_count, start_step=start
                )
            )
            for p in range(process_count)
        ]
        for part in parts:
            assert len(part["label"]) == 32 // process_count
        # Host p holds rows [p*b, (p+1)*b): together exactly the global batch, in order, so the
        # hosts' shards are disjoint slices of one batch of distinct examples.
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_mesh_groups_devices_by_process():
    mesh = parallel.make_mesh()
    assert [d.process_index for d in mesh.devices] == sorted(d.process_index for d in jax.devices())


def _main_alone(process_id, port, timeout_s):
    return _start(
        [
            sys.executable,
            "-m",
            "simclr_jax.main",
            *TINY_FLAGS,
            "--workdir=/nonexistent/never-written",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process_id}",
            f"--config.distributed.initialization_timeout={timeout_s}",
        ],
        _env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    )


def test_unreachable_coordinator_fails_in_bounded_time_with_a_clear_message():
    timeout_s = 3
    port, lonely_port = _free_port(), _free_port()
    t0 = time.monotonic()
    # Process 1 of 2 whose coordinator (process 0) never starts: nobody listens on `port`.
    orphan = _main_alone(1, port, timeout_s)
    # Process 0 of 2 whose peer never starts: it hosts the coordinator and waits for process 1.
    lonely = _main_alone(0, lonely_port, timeout_s)
    try:
        rc_o, out_o = _finish(orphan, 120)
        t_o = time.monotonic() - t0
        rc_l, out_l = _finish(lonely, 120)
        t_l = time.monotonic() - t0
    finally:
        _kill_group(orphan)
        _kill_group(lonely)
    assert rc_o == 1, out_o[-3000:]
    assert f"cannot reach the JAX coordinator at 127.0.0.1:{port}" in out_o, out_o[-3000:]
    assert "error:" in out_o and "Traceback" not in out_o, out_o[-3000:]
    assert rc_l == 1, out_l[-3000:]
    assert "jax.distributed.initialize did not complete" in out_l, out_l[-3000:]
    assert f"127.0.0.1:{lonely_port}" in out_l, out_l[-3000:]
    # Python start-up (imports) takes a few seconds on a busy 2-core machine; the wait itself
    # is bounded by the 3 s timeout (JAX alone would abort later, with no address).
    for elapsed in (t_o, t_l):
        assert timeout_s <= elapsed < timeout_s + 45, (t_o, t_l)


FAKE_MAIN = """#!{python}
import glob, os, signal, sys, time
if any(a.endswith("process_id=0") for a in sys.argv):
    deadline = time.time() + 20  # fail once the others run, so that they must be stopped
    while len(glob.glob(os.path.join({tmp!r}, "pid-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    print("process 0 fails on purpose", flush=True)
    sys.exit(3)
with open(os.path.join({tmp!r}, "pid-%d" % os.getpid()), "w"):
    pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a peer stuck in a collective ignores SIGTERM
time.sleep(120)
"""


def test_launcher_fails_when_one_process_fails_and_stops_the_others(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_MAIN.format(python=sys.executable, tmp=str(tmp_path)))
    fake.chmod(0o755)
    t0 = time.monotonic()
    proc = _start(
        ["bash", LAUNCHER, "-n", "3", "-d", "1", "-p", str(_free_port()), "--", "--x"],
        _env(PYTHON=str(fake), KILL_GRACE="1"),
    )
    try:
        rc, out = _finish(proc, 60)
    finally:
        _kill_group(proc)
    assert rc == 3, out
    assert "[0] process 0 fails on purpose" in out
    assert time.monotonic() - t0 < 30
    pids = [int(p.name[4:]) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
