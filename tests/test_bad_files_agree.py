"""Bad-file decisions outside the run loop's stream: eval passes and distillation's two streams.

With several processes an eval stream never stops itself mid-pass (a process stopping alone
would leave the others in a collective): after the pass the processes sum their counts and all
stop with the same line. Distillation reads two streams in lockstep; the loop takes their
counts as one stream's. Several processes are stood in for by a patched `gather_json` (the
real two-process agreement is `test_bad_files_multihost.py`'s).
"""

import numpy as np
import pytest
from tiny import data_config

from simclr_jax import data
from simclr_jax.data import labelled, streams
from simclr_jax.data.stats import BadDataError, JointStats, StreamStats
from simclr_jax.runtime import loop, parallel


def _folder(root, bad: int) -> str:
    """ROOT/<class>/*.jpg: 20 JPEGs in two classes, the first `bad` of class c0 emptied."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(20):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            root / f"c{i % 2}" / f"{i:02d}.jpg"
        )
    for i in range(bad):
        open(root / "c0" / f"{2 * i:02d}.jpg", "wb").close()
    return str(root)


def test_joint_stats_sum_the_streams_and_pass_the_loops_settings_on():
    a, b = StreamStats(max_fraction=0.5), StreamStats(max_fraction=0.5)
    joint = JointStats([a, b])
    joint.keep_history, joint.decide_locally = True, False
    assert (a.keep_history, b.keep_history, a.decide_locally, b.decide_locally) == (
        True,
        True,
        False,
        False,
    )
    for reads, bad in ((4, 0), (4, 1)):  # two batches of each stream
        for s, name in ((a, "x.jpg"), (b, "y.jpg")):
            s.read += reads
            for _ in range(bad):
                s.add_bad(name)
            s.batch_done()
    first, both = joint.through(1), None
    assert (first.read, first.bad) == (8, 0)
    both = joint.through(2)
    assert (both.read, both.bad, both.bad_names) == (16, 2, ["x.jpg", "y.jpg"])


def test_an_eval_pass_on_several_processes_stops_every_one_after_the_pass(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "images", bad=1)
    config = data_config("image_folder", 4, 0, folder=folder, image_size=8, max_bad_fraction=0.0)
    # Process 0 of 2 reads examples 0, 2, 4, ...: with max_bad_fraction 0 one bad file would stop
    # a single process as it reads; here the pass ends, masked.
    batches, n = labelled.eval_batches(config, "train", 4, process_index=0, process_count=2)
    seen = [next(batches) for _ in range(n)]
    assert not batches.stats.decide_locally
    assert sum(int(b["mask"].sum()) for b in seen) + batches.stats.bad == len(
        data.folder_splits(folder)[1]["train"][0][0::2]
    )
    # The other process read 8 files, one of them bad too: 2 of all read > 0 stops both.
    other = {"read": 8, "bad": 1, "bad_names": ["/other/host.jpg"]}
    mine = batches.stats.summary()
    monkeypatch.setattr(parallel, "gather_json", lambda value: [mine, other])
    with pytest.raises(BadDataError, match="stopped after its pass over the split on all 2"):
        loop.finish_eval_stream("kNN bank", batches)


def test_an_eval_pass_with_few_bad_files_on_all_processes_goes_on(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "images", bad=1)
    config = data_config("image_folder", 4, 0, folder=folder, image_size=8, max_bad_fraction=0.5)
    batches, n = labelled.eval_batches(config, "train", 4, process_index=0, process_count=2)
    for _ in range(n):
        next(batches)
    monkeypatch.setattr(parallel, "gather_json", lambda value: [value, value])
    loop.finish_eval_stream("kNN bank", batches)  # 2 of >= 1000 reads: under the limit


def test_joined_streams_combine_lockstep_batches_and_close_them():
    closed = []

    class Part:
        def __init__(self, name):
            self.name, self.stats = name, StreamStats()

        def __next__(self):
            return {"x": np.array([self.name])}

        def close(self):
            closed.append(self.name)

    joined = streams.Joined([Part("a"), Part("b")], lambda p, q: {"x": p["x"], "y": q["x"]})
    batch = next(joined)
    assert (batch["x"][0], batch["y"][0]) == ("a", "b")
    assert isinstance(joined.stats, JointStats) and len(joined.stats.parts) == 2
    joined.close()
    assert closed == ["a", "b"]
