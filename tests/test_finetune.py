"""Downstream runs from an export: fine-tuning and linear evaluation on the digits, streamed.

Both learn (accuracy above chance), resume after a kill to exactly the uninterrupted run, write
their results and refuse bad input at start without touching the workdir.
"""

import json
import os

import jax
import numpy as np
import pytest
from tiny import tiny_config

from simclr_jax import checkpoint, modes
from simclr_jax.data import labelled
from simclr_jax.evals import classifier, finetune, linear_eval


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 20-step tiny pretraining run (no end-of-run evaluation): checkpoints and export.

    20 steps bring the BN running statistics (momentum 0.9) close enough to the features' own
    for an inference-mode encoder to give usable features.
    """
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = tiny_config(total_steps=20, checkpoint_every_steps=20)
    config.eval.at_end = False
    modes.pretrain(config, workdir)
    return workdir


def _config(init_from="", **section):
    c = tiny_config(total_steps=20, init_from=init_from)
    c.log_every_steps = 20
    c.checkpoint_every_steps = 25
    c.eval.batch_size = 96  # 360 test digits: the last batch is padded
    for name in ("finetune", "linear_eval"):
        c[name].batch_size = 64
        c[name].epochs = 3.0  # 66 steps of 64 of the 1437 training digits
        c[name].optimizer = "sgd"
        c[name].lr_scaling = "none"
        c[name].base_lr = 0.02 if name == "linear_eval" else 0.1
    c.linear_eval.knn = False
    for k, v in section.items():
        c.finetune[k] = v
    return c


class Killed(Exception):
    pass


def _kill_after(monkeypatch, batches):
    """The next run's train stream dies after `batches` batches (like SIGKILL: no final save)."""
    real = labelled.labelled_train_iterator

    def dying(*args, **kwargs):
        it = real(*args, **kwargs)
        for _ in range(batches):
            yield next(it)
        raise Killed

    monkeypatch.setattr(labelled, "labelled_train_iterator", dying)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_export_holds_encoder_head_and_description(pretrained):
    variables, meta = checkpoint.load_export(os.path.join(pretrained, "export"))
    assert set(variables["params"]) == {"encoder", "head"}
    assert meta["model"]["depth"] == 18 and meta["model"]["base_width"] == 4
    assert meta["source"]["step"] == 20


def test_finetune_learns_and_resumes_after_a_kill_to_the_same_result(
    pretrained, tmp_path, monkeypatch
):
    export = os.path.join(pretrained, "export")
    config = _config(export, eval_every_epochs=1.0, from_head_layer=1)
    full = finetune.finetune(config, str(tmp_path / "full"))
    assert full["num_labels"] == 1437 and full["steps"] == 66
    assert full["top1"] > 0.2 and full["top5"] > full["top1"], full  # chance: 0.1 / 0.5
    saved = json.load(open(tmp_path / "full" / "finetune.json"))
    assert {"top1", "top5", "epochs", "num_labels", "source", "config"} <= set(saved)
    assert saved["source"] == os.path.abspath(export) and saved["config"]["finetune"]["epochs"]
    assert [h["step"] for h in saved["history"]] == [22, 44, 66]
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [20, 40, 60, 66]
    page = open(modes.run("report", config, str(tmp_path / "full"), False)).read()
    assert "Downstream results" in page and "eval_top1.png" in page and "No eval.json" not in page

    workdir = str(tmp_path / "killed")
    _kill_after(monkeypatch, 30)  # the checkpoint of step 25 survives
    with pytest.raises(Killed):
        finetune.finetune(config, workdir)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["25"]
    monkeypatch.undo()
    resumed = finetune.finetune(config, workdir)
    assert (resumed["top1"], resumed["top5"]) == (full["top1"], full["top5"])
    for a, b in zip(_leaves(resumed["variables"]), _leaves(full["variables"]), strict=True):
        np.testing.assert_array_equal(a, b)

    changed = _config(export, eval_every_epochs=1.0, from_head_layer=1)
    changed.finetune.base_lr = 0.3
    with pytest.raises(ValueError, match="finetune.base_lr: 0.1 -> 0.3"):
        finetune.finetune(changed, workdir)


def test_linear_eval_of_the_workdir_checkpoint_learns(pretrained):
    config = _config()
    config.linear_eval.knn = True
    result = modes.run("linear_eval", config, pretrained, False)
    assert result["top1"] > 0.2 and result["knn_top1"] > 0.2, result
    saved = json.load(open(os.path.join(pretrained, "linear_eval.json")))
    assert saved["source"] == os.path.abspath(pretrained) and saved["epochs"] == 3.0
    # Its run files live beside the pretraining run's, which stays untouched.
    assert os.listdir(checkpoint.checkpoint_dir(pretrained)) == ["20"]
    assert os.path.exists(os.path.join(linear_eval.run_dir(config, pretrained), "metrics.jsonl"))
    page = open(modes.run("report", config, pretrained, False)).read()
    assert "Downstream results" in page and "linear_eval_loss.png" in page


def test_label_fraction_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(10), [30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
    a = finetune.label_subset(labels, 0.1, seed=0)
    np.testing.assert_array_equal(a, finetune.label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(a, finetune.label_subset(labels, 0.1, seed=1))
    np.testing.assert_array_equal(np.bincount(labels[a]), [3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert np.bincount(labels[finetune.label_subset(labels, 0.01, 0)]).min() == 1


def test_top5_on_a_hand_made_example():
    logits = np.array(
        [
            [0, 1, 2, 3, 4, 5, 6],  # label 6: top-1; label 2: in the top 5
            [6, 5, 4, 3, 2, 1, 0],  # label 5: 6th largest: not in the top 5
            [0, 0, 9, 0, 0, 0, 0],
        ],
        np.float32,
    )
    labels = np.array([6, 5, 1])
    np.testing.assert_array_equal(classifier.topk_correct(logits, labels, 1), [True, False, False])
    np.testing.assert_array_equal(classifier.topk_correct(logits, labels, 5), [True, False, True])
    # k beyond the classes: every label counts.
    assert bool(np.all(classifier.topk_correct(logits[:, :3], np.array([0, 1, 2]), 5)))


def _assert_untouched(workdir, before):
    assert sorted(os.listdir(workdir)) == before


def test_bad_input_is_refused_at_start_naming_the_value(pretrained, tmp_path):
    export = os.path.join(pretrained, "export")
    workdir = tmp_path / "ft"
    workdir.mkdir()
    with pytest.raises(ValueError, match="init_from"):
        finetune.finetune(_config(""), str(workdir))
    with pytest.raises(checkpoint.CheckpointError, match="not a simclr_jax export"):
        finetune.finetune(_config(str(tmp_path)), str(workdir))
    with pytest.raises(ValueError, match=r"label_fraction=1.5 is invalid: in \(0, 1\]"):
        finetune.finetune(_config(export, label_fraction=1.5), str(workdir))
    with pytest.raises(ValueError, match="subset='2pct'.*1pct, 10pct"):
        finetune.finetune(_config(export, subset="2pct"), str(workdir))
    with pytest.raises(ValueError, match="subset='1pct' is an ImageNet subset"):
        finetune.finetune(_config(export, subset="1pct"), str(workdir))
    with pytest.raises(ValueError, match="from_head_layer=3 is invalid.*0..2"):
        finetune.finetune(_config(export, from_head_layer=3), str(workdir))
    # An export whose variables do not fit its own description (here: a wider network).
    bad = tmp_path / "bad_export"
    variables, meta = checkpoint.load_export(export)
    meta["model"]["base_width"] = 8
    checkpoint.export_encoder(str(bad), variables, meta["model"], meta["source"])
    with pytest.raises(checkpoint.CheckpointError, match=r"has shape .* needs"):
        finetune.finetune(_config(str(bad)), str(workdir))
    _assert_untouched(str(workdir), [])
    # A pretraining workdir is no place for a fine-tuning run.
    before = sorted(os.listdir(pretrained))
    with pytest.raises(ValueError, match="holds a pretraining run"):
        finetune.finetune(_config(export), pretrained)
    _assert_untouched(pretrained, before)


def test_results_record_the_export_architecture_not_the_overridden_config(
    pretrained, tmp_path, caplog
):
    config = _config(init_from=os.path.join(pretrained, "export"))
    config.linear_eval.precompute_features = True  # the fast probe: this test is about the file
    config.linear_eval.epochs = 1.0
    config.model.base_width = 8  # the export is base width 4: ignored, and said so
    with caplog.at_level("WARNING"):
        result = modes.run("linear_eval", config, str(tmp_path), False)
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and "model.base_width=8 (the encoder has 4)" in lines[0], lines
    saved = json.load(open(tmp_path / "linear_eval.json"))
    assert saved["model"]["base_width"] == 4 == saved["config"]["model"]["base_width"]
    assert saved["model"] == result["model"]
