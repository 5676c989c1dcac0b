"""`--mode=import_official`: official SimCLR TF checkpoints (TF2, SavedModel, TF1) into exports.

The official models come from tests/simclr_tf_reference.py (official names, layouts and numerics
in our own TF code), at base width 8 on 28 px images: 28 -> 14 (even: TF's 'SAME' max-pool
differs from torchvision's) -> 7 (odd, into the strided stage 2: fixed padding and the ResNet-D
pad are used).
"""

import functools
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import simclr_tf_reference as ref
from tiny import tiny_config

from simclr_jax import checkpoint, models, modes
from simclr_jax.interop import export_torch

IMAGES = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 3)).astype(np.float32)
ARCHS = {"r50_sk": (50, 0.0625), "r50": (50, 0.0), "r18_sk": (18, 0.0625), "r18": (18, 0.0)}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """name -> (TF outputs on IMAGES, {'tf2': prefix, 'tf1': prefix, 'saved_model': dir})."""
    out = {}
    for name, (depth, sk) in ARCHS.items():
        model = ref.Model(depth, 8, sk, seed=depth)
        d = str(tmp_path_factory.mktemp(name))
        paths = {
            "tf2": ref.save_tf2(model, d),
            "tf1": ref.save_tf1(model, os.path.join(d, "model.ckpt-7")),
            "saved_model": ref.save_saved_model(model, os.path.join(d, "saved_model")),
        }
        out[name] = (model(IMAGES), paths)
    return out


def _import(source: str, workdir: str) -> tuple[dict, dict]:
    config = tiny_config()
    config.init_from = source
    path = modes.run("import_official", config, workdir, False)
    assert path == checkpoint.export_dir(workdir)
    return checkpoint.load_export(path)


@functools.cache
def _apply(model_config: tuple):
    """Jitted inference of the export's encoder, projection head and linear head."""
    m = ml_collections.ConfigDict(dict(model_config))
    encoder = models.create_encoder(m)
    head = models.ProjectionHead(
        num_layers=m.head_layers, hidden_dim=m.head_hidden_dim, out_dim=m.head_out_dim
    )

    @jax.jit
    def apply(v, x):
        part = lambda p: {"params": v["params"][p], "batch_stats": v["batch_stats"][p]}  # noqa: E731
        features = encoder.apply(part("encoder"), x, train=False)
        projection = head.apply(part("head"), features, train=False)[-1]
        logits = features @ v["params"]["linear_head"]["dense"]["kernel"]
        return features, projection, logits + v["params"]["linear_head"]["dense"]["bias"]

    return apply


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("r50_sk", "tf2"),
        ("r50_sk", "tf1"),
        ("r50", "tf1"),
        ("r50", "saved_model"),
        ("r18_sk", "saved_model"),
        ("r18", "tf2"),
    ],
)
def test_import_gives_the_official_features(official, tmp_path, name, fmt):
    want, paths = official[name]
    variables, meta = _import(paths[fmt], str(tmp_path))
    m = meta["model"]
    depth, sk = ARCHS[name]
    # the architecture is read from the checkpoint, not from the (tiny digits) config
    assert (m["depth"], m["sk_ratio"], m["base_width"], m["width_multiplier"]) == (depth, sk, 8, 1)
    assert (m["stem"], m["compat"], m["head_layers"], m["head_out_dim"]) == (
        "imagenet",
        "simclr_tf",
        3,
        8,
    )
    assert meta["source"]["format"] == ("tf1" if fmt == "tf1" else "tf2")
    assert meta["source"]["supervised_head"] == {"num_classes": 5, "input": "features"}
    features, projection, logits = _apply(tuple(sorted(m.items())))(variables, IMAGES)
    # Inference mode, fp32: the same numbers up to summation order (measured: 2e-6).
    assert _rel(features, want["features"]) < 1e-4
    assert _rel(projection, want["projection"]) < 1e-4
    assert _rel(logits, want["logits"]) < 1e-4


def test_torchvision_layout_would_not_match(official, tmp_path):
    """The TF max-pool alignment is matched, not approximated: torchvision's differs."""
    want, paths = official["r50"]
    variables, meta = _import(paths["tf2"], str(tmp_path))
    m = dict(meta["model"], compat="torchvision")
    features, _, _ = _apply(tuple(sorted(m.items())))(variables, IMAGES)
    assert _rel(features, want["features"]) > 1e-3


def test_reimport_replaces_but_a_foreign_export_is_kept(official, tmp_path):
    _, paths = official["r18"]
    _import(paths["tf2"], str(tmp_path))
    _import(paths["tf2"], str(tmp_path))  # the same source again: replaced
    # a directory with one checkpoint and no 'checkpoint' file (tf.train.Checkpoint.write)
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in os.listdir(os.path.dirname(paths["tf2"])):
        if f.startswith("ckpt-7"):
            shutil.copy(os.path.join(os.path.dirname(paths["tf2"]), f), lone / f)
    _, meta = _import(str(lone), str(tmp_path / "w_lone"))
    assert meta["source"]["checkpoint_prefix"] == str(lone / "ckpt-7")
    msg = _one_line_error(os.path.dirname(paths["tf2"]), str(tmp_path / "w2"), "several check")
    assert "ckpt-7" in msg and "model.ckpt-7" in msg
    with pytest.raises(checkpoint.CheckpointError, match="already holds an export"):
        _import(paths["tf1"], str(tmp_path))


def test_export_torch_refuses_sk_and_notes_the_pool_of_plain(official, tmp_path, capsys):
    _, paths = official["r50_sk"]
    _import(paths["tf2"], str(tmp_path / "sk"))
    with pytest.raises(ValueError, match="torchvision has no SK-ResNet layout"):
        export_torch.export_torch(checkpoint.export_dir(str(tmp_path / "sk")))
    _, paths = official["r50"]
    _import(paths["tf2"], str(tmp_path / "plain"))
    written = export_torch.export_torch(checkpoint.export_dir(str(tmp_path / "plain")))
    assert os.path.exists(written["encoder"])
    assert "max-pool" in capsys.readouterr().out


def _one_line_error(source: str, workdir: str, match: str | None) -> str:
    with pytest.raises((checkpoint.CheckpointError, ValueError), match=match) as info:
        _import(source, workdir)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line_errors_naming_the_path(official, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert str(text) in _one_line_error(str(text), str(tmp_path / "w1"), "not a TensorFlow")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _one_line_error(str(empty), str(tmp_path / "w2"), "no TensorFlow check")
    # truncated files: the data shard (read per tensor) and the index (read at open)
    _, paths = official["r18"]
    for part, n in (("data-00000-of-00001", 0), ("index", 1)):
        cut = tmp_path / f"cut_{part[:4]}"
        cut.mkdir()
        for f in os.listdir(os.path.dirname(paths["tf2"])):
            if f.startswith("ckpt-7"):
                shutil.copy(os.path.join(os.path.dirname(paths["tf2"]), f), cut / f)
        target = cut / f"ckpt-7.{part}"
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2] if n == 0 else data[:40])
        msg = _one_line_error(str(cut / "ckpt-7"), str(tmp_path / f"w_{n}"), "cannot read")
        assert str(cut / "ckpt-7") in msg


def test_unsupported_architectures_are_named(tmp_path):
    ref.LAYOUTS[10] = (ref.BottleneckBlock, [1, 1, 1, 1])
    try:
        model = ref.Model(10, 8, 0.0, head_layers=2, num_classes=0)
    finally:
        del ref.LAYOUTS[10]
    tf2 = ref.save_tf2(model, str(tmp_path))
    msg = _one_line_error(tf2, str(tmp_path / "w1"), r"\[1, 1, 1, 1\] per stage is not supported")
    assert tf2 in msg
    tf1 = ref.save_tf1(model, str(tmp_path / "model.ckpt-7"))
    msg = _one_line_error(tf1, str(tmp_path / "w2"), "match no official SimCLR ResNet")
    assert tf1 in msg


def test_v1_release_without_projection_head(tmp_path):
    """SimCLR v1 releases: encoder + supervised head, no projection head (head_layers 0)."""
    model = ref.Model(18, 8, 0.0, head_layers=0, num_classes=3, cifar_stem=True)
    want = model(IMAGES)
    variables, meta = _import(ref.save_tf1(model, str(tmp_path / "model.ckpt-7")), str(tmp_path))
    m = ml_collections.ConfigDict(meta["model"])
    assert (m.head_layers, m.stem, "head" in variables["params"]) == (0, "cifar", False)
    enc = {
        "params": variables["params"]["encoder"],
        "batch_stats": variables["batch_stats"]["encoder"],
    }
    features = jax.jit(functools.partial(models.create_encoder(m).apply, train=False))(enc, IMAGES)
    assert _rel(features, want["features"]) < 1e-4


def test_random_files_named_like_a_checkpoint_are_one_line_errors(tmp_path):
    """Malformed layouts: garbled `checkpoint` file, garbled index, a state naming no files."""
    rng = np.random.default_rng(0)
    cases = {
        "garbled_state": ("checkpoint", "ckpt-1.index", "ckpt-1.data-00000-of-00001"),
        "garbled_index": ("ckpt-1.index", "ckpt-1.data-00000-of-00001"),
    }
    for name, files in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_bytes(bytes(rng.integers(128, 256, 300, dtype=np.uint8)))
        msg = _one_line_error(str(folder), str(tmp_path / f"w_{name}"), None)
        assert str(folder) in msg and ("checkpoint" in msg), msg
    assert "'checkpoint' file" in _one_line_error(
        str(tmp_path / "garbled_state"), str(tmp_path / "w_again"), "not a TensorFlow checkpoint"
    )
    stale = tmp_path / "stale_state"
    stale.mkdir()
    (stale / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    msg = _one_line_error(str(stale), str(tmp_path / "w_stale"), None)
    assert str(stale) in msg, msg
