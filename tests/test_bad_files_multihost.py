"""Multi-host bad-file decision: processes agree on the summed counts and stop together.

Two real `python -m simclr_jax.main` processes on 127.0.0.1 (gloo collectives, one CPU device
each) pretrain on an image folder in which only process 1's rows hold an undecodable file. With
`data.max_bad_fraction=0` that file must stop the run: both processes stop at the same step with
the same one line, instead of process 1 stopping alone and leaving process 0 in a collective.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np

from simclr_jax import data
from simclr_jax.data import streams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEED, BAD_STEP = 8, 0, 2  # the bad file is in process 1's rows of global batch 2


def _folder(root) -> tuple[str, str]:
    """30 JPEGs in two classes (24 train); (folder, the train file made empty: host 1's, step 2)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(30):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i:02d}.jpg")
    paths = data.folder_splits(str(root))[1]["train"][0]
    # Host p holds rows [p*b, (p+1)*b) of each global batch (b = 4 here); epoch 0 is a
    # permutation, so this file is in no other row of steps 0..2 on either process.
    index = streams.batch_indices(SEED, len(paths), BATCH, BAD_STEP)[BATCH // 2]
    with open(paths[index], "wb"):
        pass  # empty: "Input is empty" when decoded
    return str(root), str(paths[index])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_one_hosts_bad_file_stops_every_host_at_the_same_step(tmp_path):
    folder, bad = _folder(tmp_path / "images")
    workdir = tmp_path / "run"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # a fifth of the tiny ResNet's compile time
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    flags = [
        f"--config={REPO}/configs/digits.py",
        "--config.dataset=image_folder",
        f"--config.data.folder={folder}",
        f"--config.seed={SEED}",
        "--config.data.max_bad_fraction=0.0",
        f"--config.batch_size={BATCH}",
        "--config.total_steps=6",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=6",
        "--config.eval.at_end=False",
        "--config.data.image_size=8",
        "--config.augment.image_size=8",
        "--config.model.depth=18",
        "--config.model.base_width=4",
        "--config.model.head_hidden_dim=16",
        "--config.model.head_out_dim=16",
        f"--workdir={workdir}",
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        "--config.distributed.initialization_timeout=120",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simclr_jax.main",
                *flags,
                f"--config.distributed.process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # killed with its group if the test times out
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    errors = [[line for line in out.splitlines() if line.startswith("error: ")] for out in outs]
    for proc, out, lines in zip(procs, outs, errors, strict=True):
        assert proc.returncode == 1, out[-4000:]
        assert "Traceback" not in out and len(lines) == 1, out[-4000:]
    # The same line on both: the step (batches 0..2 taken), the summed counts, the file.
    assert errors[0] == errors[1]
    line = errors[0][0]
    assert f"pretrain: stopped at step {BAD_STEP + 1} on all 2 processes: 1 of " in line, line
    assert "data.max_bad_fraction=0.0" in line and bad in line, line
    # Process 0 writes the metrics: the steps before the stop, nothing skipped yet.
    rows = [json.loads(r) for r in open(workdir / "metrics.jsonl")]
    assert [(r["step"], r["skipped_files"]) for r in rows] == [(1, 0.0), (2, 0.0)]
