"""Every registered method and every job on a tiny ViT encoder (config.model.name='vit').

The methods know no encoder: one step of each on a 1-block width-16 ViT with 4 px patches on
8 px digits changes the encoder and gives finite metrics. One whole run (pretrain, export,
end-of-run evaluation, report) then feeds linear evaluation and fine-tuning.
"""

import json
import os

import jax
import numpy as np
import pytest
from tiny import model_and_optimizer, tiny_config

from simclr_jax import checkpoint, config_base, data, methods, modes
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import parallel

# The methods before ViTs: each must run on one unchanged.
CORE = ("simclr", "moco", "byol", "simsiam", "instdisc")


def vit_config(method="simclr", **overrides):
    """`tiny_config` on ViT 'mu/4' (1 block, width 16, 2 heads) with small method sections."""
    c = tiny_config(method=method, **overrides)
    c.model.name, c.model.variant = "vit", "mu/4"
    for name in ("byol", "simsiam", "mocov3"):
        if name in c and "predictor_hidden_dim" in c[name]:
            c[name].predictor_hidden_dim = 16
    c.moco.queue_size = 64
    c.instdisc.num_negatives = 64
    return c


@pytest.mark.parametrize("method", methods.names())
def test_one_step_of_every_method_on_a_vit(method):
    config = vit_config(method, total_steps=2)
    config.optim.warmup_epochs = 0.0  # the first step at the peak LR (a warm-up's is 0)
    # No augmentation but the crop: off at trace time, the ops cost no compile time here.
    config.augment.color_jitter_prob = config.augment.grayscale_prob = 0.0
    config.augment.blur_prob = config.augment.solarize_prob = 0.0
    try:
        config_base.validate_config(config)
    except config_base.ConfigError as e:
        # A later method whose tiny config needs more than this (or another encoder) says so
        # in one line; the methods before ViTs must run.
        assert method not in CORE and "\n" not in str(e), e
        return
    mesh = parallel.make_mesh()
    model, tx, schedule = model_and_optimizer(config)
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    before = jax.device_get(state.params["encoder"])
    step = pretrain_state.compile_train_step(config, model, tx, schedule, mesh, 2)
    batches = data.pretrain_iterator(config, with_index=methods.get(method).needs_index)
    state, metrics = step(state, parallel.host_to_global(next(batches), mesh))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]), metrics
    after = jax.device_get(state.params["encoder"])
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]
    # Every encoder leaf but the zero-initialised-gradient-free ones moves (a frozen patch
    # embedding, MoCo v3's, stays): at least the transformer block's kernels do.
    assert sum(moved) >= len(moved) - 2, method
    assert state.batch_stats.get("encoder") is None  # LayerNorm only: no BN statistics


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A 20-step ViT SimCLR run through `modes.pretrain`: export, end-of-run eval, report."""
    workdir = str(tmp_path_factory.mktemp("vit_pretrain"))
    config = vit_config(total_steps=20, checkpoint_every_steps=20)
    config.eval.linear_epochs = 2.0
    # Crops and flips only: colour jitter and blur add compile time, not coverage.
    config.augment.color_jitter_prob = config.augment.blur_prob = 0.0
    modes.pretrain(config, workdir)
    return config, workdir


def test_a_vit_run_exports_evaluates_and_reports(vit_run):
    config, workdir = vit_run
    result = json.load(open(os.path.join(workdir, "eval.json")))
    for kind in ("linear", "knn"):
        for encoder in ("random_init", "pretrained"):
            assert 0.1 < result[kind][encoder] <= 1.0, result  # chance: 0.1
    variables, meta = checkpoint.load_export(os.path.join(workdir, "export"))
    assert meta["model"]["name"] == "vit" and meta["model"]["posemb_grid"] == 2
    assert "embedding" in variables["params"]["encoder"]
    assert variables["batch_stats"]["encoder"] == {}
    page = open(modes.run("report", config, workdir, False)).read()
    assert "model.variant" in page and "model.depth" not in page


def _downstream_config(export, image_size=8):
    """3 epochs of 64 without crops: a 20-step ViT's features need them to clear chance."""
    c = vit_config(total_steps=20, init_from=export)
    c.log_every_steps, c.checkpoint_every_steps = 20, 1000
    c.data.image_size = c.augment.image_size = image_size
    for name in ("finetune", "linear_eval"):
        c[name].batch_size, c[name].epochs, c[name].augment = 64, 3.0, False
        c[name].optimizer, c[name].lr_scaling, c[name].base_lr = "sgd", "none", 0.3
    c.finetune.base_lr = 0.05
    return c


def test_linear_eval_at_another_resolution_and_finetune_learn(vit_run, tmp_path):
    """Linear eval + kNN at 16 px of an encoder pretrained at 8 px (its 2 x 2 position grid
    resized to 4 x 4; each patch now sees a quarter of what it saw), and fine-tuning at 8 px:
    both at least twice chance (0.1)."""
    _, workdir = vit_run
    export = os.path.join(workdir, "export")
    c = _downstream_config(export, image_size=16)
    c.linear_eval.knn = True
    lin = modes.run("linear_eval", c, str(tmp_path / "lin16"), False)
    assert lin["top1"] > 0.2 and lin["knn_top1"] > 0.2, lin
    ft = modes.run("finetune", _downstream_config(export), str(tmp_path / "ft"), False)
    assert ft["top1"] > 0.2, ft
