"""The loop stays on device: no implicit transfers, one compile (also after resume), bf16 ~ fp32."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest
from tiny import loop_config, tiny_config

from simclr_jax import checkpoint, modes


def _compiles_of_train_step(records) -> int:
    return sum(r.getMessage().startswith("Compiling jit(train_step)") for r in records)


def test_loop_runs_under_transfer_guard_and_compiles_once(tmp_path, caplog):
    workdir = str(tmp_path)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING), jax.transfer_guard("disallow"):
            # 12 steps cross log (every 4) and checkpoint (every 6) boundaries.
            out = modes.pretrain(loop_config(), workdir)
        assert int(jax.device_get(out["state"].step)) == 12
        assert _compiles_of_train_step(caplog.records) == 1
        caplog.clear()
        # Resume from step 6, as after a preemption that lost the last checkpoint: exactly one
        # compile again (of the same program, so the suite's compile cache serves it), no
        # implicit transfers either.
        shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "12"))
        with caplog.at_level(logging.WARNING), jax.transfer_guard("disallow"):
            out = modes.pretrain(loop_config(), workdir)
        assert int(jax.device_get(out["state"].step)) == 12
        assert _compiles_of_train_step(caplog.records) == 1
    finally:
        jax.config.update("jax_log_compiles", False)


def test_bf16_and_fp32_runs_agree(tmp_path):
    from test_train import run_steps

    losses = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config()
        c.model.dtype = dtype
        state, losses[dtype], _ = run_steps(c, jax.devices(), 4)
        # Params and optimizer state stay fp32 whatever the compute dtype.
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    # bf16 has an 8-bit mantissa (~0.4% per rounding): over 4 steps the NT-Xent values (~5.5)
    # agree to within 2%.
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
    assert np.max(np.abs(losses["bfloat16"] - losses["float32"])) > 0  # bf16 really ran


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_keeps_loss_inputs_fp32(dtype):
    import jax.numpy as jnp

    from simclr_jax import models

    c = tiny_config()
    c.model.dtype = dtype
    model = models.create_model(c, num_classes=10)
    x = jnp.zeros((4, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out, _ = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables
    )
    assert out["projection"].dtype == jnp.float32  # NT-Xent logits are computed in fp32
    assert out["logits"].dtype == jnp.float32
    stats = jax.tree.leaves(variables["batch_stats"])
    assert {s.dtype for s in stats} == {np.dtype("float32")}  # BN statistics in fp32
