"""The one run loop on a toy step: health checks, the last good checkpoint, hooks, cadence."""

import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import checkpoint
from simclr_jax.data.pipeline import StreamStats
from simclr_jax.runtime import loop, parallel
from simclr_jax.runtime.metric_writer import MetricWriter


class Toy(flax.struct.PyTreeNode):
    """A train state with what the loop reads: params (for the update norm)."""

    step: jax.Array
    params: jax.Array


class _CountingBatches:
    """Host batches with a stream's `stats` (as streamed data gives: one bad file a batch)."""

    def __init__(self):
        self.stats = StreamStats(max_fraction=0.5)

    def __iter__(self):
        return self

    def __next__(self):
        self.stats.read += 8
        self.stats.add_bad(f"file{self.stats.bad}")
        self.stats.batch_done()
        return {"x": np.ones((8, 1), np.float32)}


def _toy_run(tmp_path, bad_key: str, bad_step: int, **run_kwargs):
    """A loop.Run whose jitted step reports `bad_key` as NaN from step `bad_step` on."""
    mesh = parallel.make_mesh()
    rep = parallel.replicated(mesh)

    @jax.jit
    def step(state, batch):
        new = Toy(state.step + 1, state.params + jnp.mean(batch["x"]))
        bad = new.step >= bad_step
        metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}
        metrics[bad_key] = jnp.where(bad, jnp.nan, metrics.get(bad_key, 1.0))
        return new, metrics

    step = loop.with_update_norm(step) if bad_key != "update_norm" else _nan_update(bad_step)
    manager = checkpoint.create_manager(str(tmp_path), keep=5)
    writer = MetricWriter(str(tmp_path))
    run = loop.Run(
        name="toy",
        step_fn=step,
        host_batches=_CountingBatches,
        mesh=mesh,
        total_steps=10,
        steps_per_epoch=5,
        batch_size=8,
        log_every=3,
        checkpoint_every=2,
        writer=writer,
        manager=manager,
        hint="lower toy.base_lr",
        progress=False,
        **run_kwargs,
    )
    state = jax.device_put(Toy(jnp.int32(0), jnp.zeros((4,))), rep)
    return run, state, manager, writer


def _nan_update(bad_step: int):
    """A step whose params (so its update norm) turn NaN at `bad_step`, loss and grads finite."""

    @jax.jit
    def step(state, batch):
        s = state.step + 1
        params = jnp.where(s >= bad_step, jnp.nan, state.params + 1.0)
        return Toy(s, params), {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    return loop.with_update_norm(step)


@pytest.mark.parametrize("bad_key", ["loss", "grad_norm", "update_norm"])
def test_a_non_finite_health_metric_stops_before_any_later_save(tmp_path, bad_key):
    run, state, manager, writer = _toy_run(tmp_path, bad_key, bad_step=5)
    try:
        with pytest.raises(FloatingPointError) as e:
            loop.run(run, state, 0)
    finally:
        writer.close()
        manager.wait_until_finished()
        manager.close()
    msg = str(e.value)
    # Metrics are checked on log steps (3, 6, 9) and before saves (2, 4, 6, ...): steps 1-4 are
    # checked finite, step 5 is not checked, step 6 (a save step) finds the NaN.
    assert "\n" not in msg and f"toy: {bad_key} is nan at step 6" in msg, msg
    assert "steps 5..6" in msg and "lower toy.base_lr" in msg
    assert f"the last checkpoint before it is step 4 ({tmp_path}/checkpoints/4)" in msg
    saved = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(str(tmp_path))))
    assert saved == [2, 4]  # nothing saved at or after the divergence


def test_hooks_cadence_metrics_and_the_final_checkpoint(tmp_path):
    calls = []
    run, state, manager, writer = _toy_run(
        tmp_path, "loss", bad_step=99, hooks=[(4, lambda s, st: calls.append(s))]
    )
    try:
        out = loop.run(run, state, 0)
    finally:
        writer.close()
        manager.close()
    assert (out.step, out.preempted, int(out.state.step)) == (10, False, 10)
    assert calls == [4, 8]  # every 4 steps, never on the last one
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6, 9, 10]
    for r in rows:
        np.testing.assert_allclose(r["update_norm"], 2.0)  # params + 1 on each of 4 entries
        assert r["images_per_sec"] > 0 and r["epoch"] == r["step"] / 5
        # The batches of the steps taken, not those read ahead (the loop places one ahead).
        assert r["skipped_files"] == r["step"]
    saved = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(str(tmp_path))))
    assert saved == [2, 4, 6, 8, 10]
