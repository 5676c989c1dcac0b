"""Multi-host downstream runs: 2 processes x 2 devices give the metrics of 1 process x 4.

`--mode=linear_eval` (with the sharded kNN) and `--mode=finetune` through the real command line
and `launch/local_multiprocess.sh`, as tests/test_multihost.py does for pretraining. Each host
feeds only its rows of every batch; only process 0 writes results.
"""

import json
import sys

import jax
import numpy as np
import pytest
from test_multihost import LAUNCHER, REPO, _env, _finish, _free_port, _kill_group, _start
from tiny import init, tiny_config

from simclr_jax import checkpoint, models

STEPS = 3
FLAGS = [
    f"--config={REPO}/configs/digits.py",
    "--config.data.image_size=8",
    "--config.augment.image_size=8",
    "--config.model.base_width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.head_out_dim=16",
    "--config.augment.area_min=0.25",  # the crops this test was set with (digits.py: 0.2)
    "--config.log_every_steps=1",
    "--config.eval.batch_size=96",  # 360 test digits: a padded last batch, 48 rows per host
    "--config.eval.knn_k=20",
]
JOBS = {
    "linear_eval": [
        "--config.linear_eval.batch_size=32",
        "--config.linear_eval.epochs=0.07",  # 3 of the 44 steps per epoch
        "--config.linear_eval.base_lr=0.05",
    ],
    "finetune": [
        "--config.finetune.batch_size=32",
        "--config.finetune.epochs=0.07",
        "--config.finetune.optimizer=sgd",
        "--config.finetune.from_head_layer=1",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both jobs as 2 x 2 and 1 x 4, all four at once, from one random-init tiny export."""
    root = tmp_path_factory.mktemp("downstream_multihost")
    config = tiny_config()
    variables = jax.device_get(
        init(
            models.create_model(config, 10),
            jax.random.key(0),
            np.zeros((2, 8, 8, 3), np.float32),
            train=False,
        )
    )
    keep = {col: {k: variables[col][k] for k in ("encoder", "head")} for col in variables}
    export = checkpoint.export_encoder(
        str(root / "export"),
        keep,
        {**config.model.to_dict(), "head_out_scale": True},
        {"test": True},
    )
    procs = {}
    for job, flags in JOBS.items():
        args = [*FLAGS, *flags, f"--mode={job}", f"--config.init_from={export}"]
        procs[job, "multi"] = _start(
            [
                "bash",
                LAUNCHER,
                "-n",
                "2",
                "-d",
                "2",
                "-t",
                "120",
                "-p",
                str(_free_port()),  # the two launches run at once: one coordinator port each
                "--",
                *args,
                f"--workdir={root / job / 'multi'}",
            ],
            _env(),
        )
        procs[job, "single"] = _start(
            [sys.executable, "-m", "simclr_jax.main", *args, f"--workdir={root / job / 'single'}"],
            _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        )
    outs = {}
    try:
        for key, proc in procs.items():
            outs[key] = _finish(proc, 420)
    finally:
        for proc in procs.values():
            _kill_group(proc)
    for key, (rc, out) in outs.items():
        assert rc == 0, (key, out[-6000:])
    return root, outs


def _read(root, job, layout):
    workdir = root / job / layout
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return rows, json.load(open(workdir / f"{job}.json"))


@pytest.mark.parametrize("job", list(JOBS))
def test_two_processes_train_and_evaluate_like_one(runs, job):
    root, outs = runs
    (multi_rows, multi), (single_rows, single) = (_read(root, job, k) for k in ("multi", "single"))
    steps = [r["step"] for r in multi_rows if "loss" in r]
    assert steps == [r["step"] for r in single_rows if "loss" in r] == list(range(1, STEPS + 1))
    for m, s in zip(multi_rows, single_rows, strict=True):
        for key in ("loss", "train_top1", "lr", "grad_norm"):
            if key in m:
                np.testing.assert_allclose(m[key], s[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert multi["num_test_examples"] == single["num_test_examples"] == 360
    # Features agree to fp32 noise: at most one of the 360 test digits may flip.
    for key in ("top1", "top5") + (("knn_top1",) if job == "linear_eval" else ()):
        assert abs(multi[key] - single[key]) <= 1 / 360, (key, multi[key], single[key])
    out = outs[job, "multi"][1]
    assert "process 0/2: 2 local of 4 global devices" in out
    # Only process 0 reports the result.
    assert [line[:4] for line in out.splitlines() if " top-1 " in line] == ["[0] "]
