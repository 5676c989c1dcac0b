"""Downstream runs on streamed data: image folders through Grain and tf.data, label subsets.

Official ImageNet subsets as index lists: tests/test_data_streamed.py.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest
from tiny import init, tiny_config

from simclr_jax import checkpoint, data, models, modes
from simclr_jax.data import datasets, labelled
from simclr_jax.evals import finetune

# The first names of google-research/simclr imagenet_subsets/1percent.txt (12,811 lines).
OFFICIAL_1PCT_HEAD = ["n04235860_14959.JPEG", "n04239074_7724.JPEG", "n02096294_8485.JPEG"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet-style train/val folders of 16 px JPEGs: class n02096294 dark, n04235860 light."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8)):
        for c, wnid in enumerate(("n02096294", "n04235860")):
            os.makedirs(root / split / wnid)
            names = [f"{wnid}_{i}.JPEG" for i in range(count)]
            if split == "train":
                names[:1] = [n for n in OFFICIAL_1PCT_HEAD if n.startswith(wnid)]
            for name in names:
                base = 60 + 130 * c
                pixels = np.clip(base + rng.integers(-40, 40, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / wnid / name)
    return str(root)


def _config(folder, export=""):
    c = tiny_config(dataset="image_folder", init_from=export)
    c.data.folder = folder
    c.data.num_threads = 1
    c.log_every_steps = c.checkpoint_every_steps = 8
    c.eval.batch_size = 24  # 16 val images: one padded batch
    c.linear_eval.update(batch_size=16, epochs=8.0, base_lr=0.1, lr_scaling="none", knn=True)
    c.eval.knn_k = 5
    return c


@pytest.fixture(scope="module")
def export(folder, tmp_path_factory):
    """A random-init tiny encoder exported (pretraining is not what these tests are about)."""
    config = _config(folder)
    model = models.create_model(config, 2)
    variables = jax.device_get(
        init(model, jax.random.key(0), np.zeros((2, 8, 8, 3), np.float32), train=False)
    )
    path = str(tmp_path_factory.mktemp("export") / "export")
    keep = {
        col: {k: variables[col][k] for k in ("encoder", "head") if k in variables[col]}
        for col in ("params", "batch_stats")
    }
    model = {**config.model.to_dict(), "head_out_scale": True}
    return checkpoint.export_encoder(path, keep, model, {"test": True})


def test_streamed_linear_eval_learns_and_resumes_after_a_kill(folder, export, tmp_path):
    config = _config(folder, export)
    full = modes.linear_eval(config, str(tmp_path / "full"))
    assert full["num_labels"] == 48 and full["steps"] == 24 and full["num_test_examples"] == 16
    assert full["top1"] >= 0.75 and full["knn_top1"] >= 0.75, full  # two classes: chance 0.5

    # SIGTERM during step 7 of 24 (the loop fetches batch 7 one step ahead): the run saves step
    # 7 and stops; the rerun starts the stream at step 7 (O(1): the order is a function of it).
    killed = str(tmp_path / "killed")
    real = labelled.labelled_train_iterator

    def terminated(*args, **kwargs):
        it = real(*args, **kwargs)
        for i in range(10**6):
            if i == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            yield next(it)

    labelled.labelled_train_iterator = terminated
    try:
        stopped = modes.linear_eval(config, killed)
    finally:
        labelled.labelled_train_iterator = real
    assert stopped["preempted"] and not os.path.exists(os.path.join(killed, "linear_eval.json"))
    assert sorted(os.listdir(checkpoint.checkpoint_dir(killed))) == ["7"]
    resumed = modes.linear_eval(config, killed)
    for key in ("top1", "top5", "knn_top1"):
        assert resumed[key] == full[key]
    for a, b in zip(
        jax.tree.leaves(jax.device_get(resumed["variables"]["params"]["classifier"])),
        jax.tree.leaves(jax.device_get(full["variables"]["params"]["classifier"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    saved = json.load(open(os.path.join(killed, "linear_eval.json")))
    assert saved["source"] == export and saved["num_labels"] == 48


def test_subset_file_of_official_names_selects_those_images(folder, tmp_path):
    names = tmp_path / "1percent.txt"
    names.write_text("\n".join(OFFICIAL_1PCT_HEAD) + "\n")
    config = _config(folder)
    config.finetune.subset = str(names)
    keep, subset = finetune.selection(config)
    assert subset == "" and len(keep) == 2
    paths = datasets.folder_splits(folder)[1]["train"][0][keep]
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        OFFICIAL_1PCT_HEAD[::2]
    )  # n04239074: no such class here
    it = labelled.labelled_train_iterator(config, 2, keep=keep, process_index=0, process_count=1)
    assert sorted(next(it)["label"].tolist()) == [0, 1]


def test_fast_probe_on_precomputed_features(folder, export, tmp_path):
    config = _config(folder, export)
    config.linear_eval.precompute_features = True
    result = modes.linear_eval(config, str(tmp_path))
    assert result["num_labels"] == 48 and result["num_examples"] == 16
    assert result["top1"] >= 0.75 and result["knn_top1"] >= 0.75, result
    assert json.load(open(tmp_path / "linear_eval.json"))["precompute_features"]


def test_a_dataset_without_labels_is_refused_at_start(export, tmp_path, monkeypatch):
    class Unlabelled:  # a tfds builder whose examples have no 'label' feature
        class info:  # noqa: N801
            features = {"image": None}

    monkeypatch.setattr(labelled, "tfds_builder", lambda config: Unlabelled())
    info = data.DatasetInfo("stl10", 10, 1, 1, 8)
    for module in (data, labelled):
        monkeypatch.setattr(module, "dataset_info", lambda config: info)
    config = tiny_config(dataset="stl10", init_from=export)
    with pytest.raises(ValueError, match="dataset='stl10' has no labels for split 'test'"):
        finetune.finetune(config, str(tmp_path / "ft"))
    assert not os.path.exists(tmp_path / "ft")
