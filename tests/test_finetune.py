"""Export -> fine-tune and linear evaluation from an export, on the bundled digits."""

import json
import os

import numpy as np
import pytest
from tiny import load_config, tiny_config

from simclr_jax import checkpoint, finetune, run_modes, train


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A short tiny pretraining run with its export and end-of-run evaluation."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    out = train.train_and_evaluate(tiny_config(total_steps=20), workdir)
    return workdir, out["eval"]


def _finetune_config(init_from, **finetune_overrides):
    c = load_config("finetune_digits")
    small = tiny_config()
    c.data.image_size = c.augment.image_size = small.data.image_size
    c.data.prefetch = 0
    c.init_from = init_from
    c.num_epochs = 15.0
    c.log_every_steps = 50
    for k, v in finetune_overrides.items():
        c.finetune[k] = v
    return c


def test_export_holds_encoder_head_and_description(pretrained):
    workdir, _ = pretrained
    variables, meta = checkpoint.load_export(os.path.join(workdir, "export"))
    assert set(variables["params"]) == {"encoder", "head"}
    assert meta["model"]["depth"] == 18 and meta["model"]["base_width"] == 4
    assert meta["source"]["step"] == 20
    assert meta["source"]["config"]["total_steps"] == 20


def test_finetune_beats_random_init_linear_probe(pretrained, tmp_path):
    workdir, ev = pretrained
    config = _finetune_config(os.path.join(workdir, "export"))
    result = finetune.finetune(config, str(tmp_path))
    assert result["num_labels"] == 1437
    assert result["test_accuracy"] > ev["linear"]["random_init"], (result, ev)
    saved = json.load(open(tmp_path / "finetune.json"))
    assert saved["test_accuracy"] == result["test_accuracy"]


def test_label_fraction_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(10), [30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
    a = finetune.label_subset(labels, 0.1, seed=0)
    b = finetune.label_subset(labels, 0.1, seed=0)
    c = finetune.label_subset(labels, 0.1, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    counts = np.bincount(labels[a], minlength=10)
    np.testing.assert_array_equal(counts, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert np.bincount(labels[finetune.label_subset(labels, 0.01, 0)]).min() == 1


def test_finetune_on_ten_percent_from_head_layer(pretrained, tmp_path):
    workdir, _ = pretrained
    config = _finetune_config(
        os.path.join(workdir, "export"), label_fraction=0.1, from_head_layer=1
    )
    config.num_epochs = 20.0
    result = finetune.finetune(config, str(tmp_path))
    assert result["num_labels"] == 142  # sum over classes of round(0.1 * n_c)
    assert 0.1 < result["test_accuracy"] <= 1.0


def test_linear_eval_from_export_matches_end_of_run_eval(pretrained, tmp_path):
    workdir, ev = pretrained
    config = tiny_config(init_from=os.path.join(workdir, "export"))
    result = run_modes.run("linear_eval", config, str(tmp_path), False)
    assert result["linear"] == pytest.approx(ev["linear"]["pretrained"])
    assert result["knn"] == pytest.approx(ev["knn"]["pretrained"])


def test_export_mode_rewrites_export_from_checkpoint(pretrained, tmp_path):
    workdir, _ = pretrained
    before, _ = checkpoint.load_export(os.path.join(workdir, "export"))
    run_modes.run("export", tiny_config(total_steps=20), workdir, False)
    after, meta = checkpoint.load_export(os.path.join(workdir, "export"))
    assert meta["source"]["step"] == 20
    for a, b in zip(
        np.concatenate([np.ravel(x) for x in _leaves(before)]),
        np.concatenate([np.ravel(x) for x in _leaves(after)]),
        strict=True,
    ):
        assert a == b


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_bad_init_from_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a simclr_jax export"):
        finetune.finetune(_finetune_config(str(tmp_path)), str(tmp_path / "ft"))
    with pytest.raises(ValueError, match="init_from"):
        finetune.finetune(_finetune_config(""), str(tmp_path / "ft"))
