"""A pretraining run on a streamed dataset (an image folder), preempted and resumed: bit-identical.

The data-level equalities (any start step, any process count) are in test_data_streamed.py; this
is the end-to-end check that the run loop restarts the stream at the checkpoint's `data_step`.
"""

import os
import signal

import jax
import numpy as np
import pytest
from tiny import loop_config

from simclr_jax import checkpoint, data, modes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """1430 random-texture JPEGs of varied sizes in 10 classes.

    As many steps per epoch and classes as the digits the loop tests run (`loop_config`), so
    this run's train step is the one they compiled (the suite's compilation cache has it).
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(1430):
        (root / f"c{i % 10}").mkdir(exist_ok=True)
        h, w = int(rng.integers(8, 14)), int(rng.integers(8, 14))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 10}" / f"{i}.jpg")
    return str(root)


def _config(folder):
    c = loop_config()
    c.dataset = "image_folder"
    c.data.folder = folder
    c.data.num_threads = 1
    return c


def test_preempted_streamed_pretraining_resumes_bit_identical(folder, tmp_path, monkeypatch):
    config = _config(folder)
    full = modes.pretrain(config, str(tmp_path / "full"))
    assert not full["preempted"]

    # SIGTERM while batch 8 is fetched (the loop reads one step ahead): the run saves the step it
    # reached and stops; the rerun restarts the stream at the saved data step.
    killed = str(tmp_path / "killed")
    real = data.pretrain_iterator

    def terminated(*args, **kwargs):
        it = real(*args, **kwargs)
        for i in range(10**6):
            if i == 8 and kwargs.get("start_step", 0) == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield next(it)

    monkeypatch.setattr(data, "pretrain_iterator", terminated)
    stopped = modes.pretrain(config, killed)
    assert stopped["preempted"]
    steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(killed)) if s.isdigit())
    assert steps and 6 < steps[-1] < 12  # past the scheduled checkpoint at step 6
    resumed = modes.pretrain(config, killed)
    assert not resumed["preempted"]
    got = jax.tree.leaves(jax.device_get(resumed["state"].params))
    want = jax.tree.leaves(jax.device_get(full["state"].params))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
