"""PyTorch export: torchvision loads it strictly and computes the JAX encoder's features."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from simclr_jax import checkpoint, models
from simclr_jax.interop import export_torch
from simclr_jax.models.resnet import RESNET_LAYOUTS


def torch_modules():
    """(torch, torchvision); a missing install FAILS the test with the hint (never skips)."""
    try:
        import safetensors  # noqa: F401
        import torch
        import torchvision
    except ImportError as e:
        pytest.fail(f"PyTorch export tests need torch: {e}. {export_torch.INSTALL_HINT}")
    torch.set_num_threads(2)
    return torch, torchvision


def model_config(depth, stem, base_width=64, width=1, head_bn=True, head_layers=2):
    """An export's `model` dict (what `export.json` holds)."""
    return ml_collections.ConfigDict(
        {
            "depth": depth,
            "width_multiplier": width,
            "base_width": base_width,
            "stem": stem,
            "zero_init_last_bn": False,
            "head_layers": head_layers,
            "head_hidden_dim": 32,
            "head_out_dim": 16,
            "head_bn": head_bn,
            "head_out_scale": True,
            "dtype": "float32",
            "sk_ratio": 0.0,
            "compat": "torchvision",
        }
    )


def randomize(shapes, rng):
    """Random, non-trivial values for a tree of shapes (numpy: no JAX compile needed).

    BN scale/var in [0.5, 1.5], shifts/means ~ N(0, 0.2^2), kernels ~ N(0, 2 / fan_in) so the
    activations keep their scale through the depth.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, x in leaves:
        name = str(path[-1].key)
        if name in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, x.shape)
        elif name in ("bias", "mean"):
            v = 0.2 * rng.standard_normal(x.shape)
        else:
            v = rng.standard_normal(x.shape) * np.sqrt(2.0 / np.prod(x.shape[:-1]))
        out.append(v.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def encoder_and_head(mc):
    """The Flax encoder and projection head an export of `mc` holds."""
    head = models.ProjectionHead(
        num_layers=mc.head_layers,
        hidden_dim=mc.head_hidden_dim,
        out_dim=mc.head_out_dim,
        use_bn=mc.head_bn,
        out_scale=mc.head_out_scale,
    )
    return models.create_encoder(mc), head


def variable_shapes(mc, image_size):
    """Shapes of the export's `{'params', 'batch_stats'}` trees, each `{'encoder', 'head'}`."""
    encoder, head = encoder_and_head(mc)

    def init(key):
        x = jax.numpy.zeros((1, image_size, image_size, 3))
        ev = encoder.init(key, x, train=False)
        hv = head.init(key, encoder.apply(ev, x, train=False), train=False)
        return {c: {"encoder": ev[c], "head": hv.get(c, {})} for c in ("params", "batch_stats")}

    return jax.eval_shape(init, jax.random.key(0))


def random_variables(mc, image_size, seed=0):
    """Export variables (encoder + head) with random weights and running statistics."""
    return randomize(variable_shapes(mc, image_size), np.random.default_rng(seed))


def jax_outputs(mc, variables, images):
    """Pooled features and final projection of the JAX encoder and head in eval mode."""
    encoder, head = encoder_and_head(mc)
    part = {k: {c: variables[c][k] for c in ("params", "batch_stats")} for k in ("encoder", "head")}

    @jax.jit
    def forward(part, images):
        features = encoder.apply(part["encoder"], images, train=False)
        return features, head.apply(part["head"], features, train=False)[-1]

    features, projection = forward(part, images)
    return np.asarray(features), np.asarray(projection)


def rel_err(a, b):
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def export_and_compare(tmp_path, mc, image_size, batch=2):
    """Exports random variables via files, loads them in torch, returns the relative errors."""
    torch, _ = torch_modules()
    variables = random_variables(mc, image_size)
    path = checkpoint.export_encoder(
        str(tmp_path / "run" / "export"), variables, mc.to_dict(), {"step": 7, "config": {}}
    )
    paths = export_torch.export_torch(path)
    assert os.path.dirname(paths["encoder"]) == str(tmp_path / "run" / "export_torch")
    encoder, head, meta = export_torch.load_torch(os.path.dirname(paths["encoder"]))
    images = np.random.default_rng(0).uniform(size=(batch, image_size, image_size, 3))
    images = images.astype(np.float32)
    features, projection = jax_outputs(mc, variables, images)
    with torch.no_grad():
        t_features = encoder(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        t_projection = head(torch.from_numpy(features.copy())).numpy()
    assert t_features.shape == features.shape == (batch, meta["torchvision"]["feature_dim"])
    assert np.std(features) > 1e-3  # non-degenerate features, so the comparison means something
    return rel_err(t_features, features), rel_err(t_projection, projection), meta


@pytest.mark.parametrize(
    "depth,stem,base_width,width,image_size",
    [
        (18, "imagenet", 64, 1, 32),  # torchvision.models.resnet18 itself
        (18, "cifar", 8, 2, 16),
        (50, "imagenet", 16, 1, 32),
        (50, "cifar", 8, 1, 16),
    ],
)
def test_torch_features_equal_jax(tmp_path, depth, stem, base_width, width, image_size):
    mc = model_config(depth, stem, base_width, width)
    feat_err, proj_err, meta = export_and_compare(tmp_path, mc, image_size)
    assert feat_err < 1e-4, feat_err
    assert proj_err < 1e-4, proj_err
    standard = stem == "imagenet" and base_width == 64 and width == 1
    assert meta["torchvision"]["constructor"] == (f"resnet{depth}" if standard else "ResNet")


def test_head_without_bn_and_three_layers(tmp_path):
    mc = model_config(18, "cifar", 4, head_bn=False, head_layers=3)
    feat_err, proj_err, _ = export_and_compare(tmp_path, mc, 8)
    assert feat_err < 1e-4 and proj_err < 1e-4, (feat_err, proj_err)


def test_head_whose_last_bn_has_no_scale(tmp_path):
    """SimSiam's projector ends in an affine-free BN: torch gets ones there, frozen."""
    torch_modules()
    mc = model_config(18, "cifar", 4)
    mc.head_out_scale = False
    feat_err, proj_err, meta = export_and_compare(tmp_path, mc, 8)
    assert feat_err < 1e-4 and proj_err < 1e-4, (feat_err, proj_err)
    assert meta["projection_head"]["out_scale"] is False
    _, head, _ = export_torch.load_torch(str(tmp_path / "run" / "export_torch"))
    assert not head.bn2.weight.requires_grad and not head.bn2.bias.requires_grad
    assert float(head.bn2.weight.min()) == float(head.bn2.weight.max()) == 1.0


def zeros_state_dict(mc):
    """The converted `state_dict` of an all-zero encoder of `mc` (shapes and keys only)."""
    shapes = variable_shapes(mc, 32)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    enc = {c: zeros[c]["encoder"] for c in ("params", "batch_stats")}
    return export_torch.encoder_state_dict(enc["params"], enc["batch_stats"], mc.depth)


@pytest.mark.parametrize(
    "depth,stem,width",
    [(d, "imagenet", 2) for d in sorted(RESNET_LAYOUTS)] + [(18, "cifar", 4), (200, "cifar", 1)],
)
def test_keys_shapes_dtypes_equal_torchvision(depth, stem, width):
    """Every depth (ResNet-200 included), widths and stems: exactly torchvision's state_dict."""
    torch_modules()
    mc = model_config(depth, stem, base_width=4, width=width)
    sd = zeros_state_dict(mc)
    want = export_torch.build_torchvision_resnet({"model": mc.to_dict()}).state_dict()
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert sd[k].shape == tuple(v.shape), k
        assert str(sd[k].dtype) == str(v.dtype).replace("torch.", ""), k


def test_standard_resnet50_keys_equal_torchvision_resnet50():
    _, torchvision = torch_modules()
    want = {k: tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()}
    want = {k: v for k, v in want.items() if not k.startswith("fc.")}
    sd = zeros_state_dict(model_config(50, "imagenet"))
    assert {k: v.shape for k, v in sd.items()} == want


def test_model_json_describes_the_build(tmp_path):
    torch_modules()
    mc = model_config(18, "cifar", 4)
    variables = random_variables(mc, 8)
    path = checkpoint.export_encoder(
        str(tmp_path / "e"), variables, mc.to_dict(), {"step": 3, "config": {}}
    )
    out = export_torch.export_torch(path, str(tmp_path / "t"))
    meta = json.load(open(out["model"]))
    assert meta["torchvision"] == {
        "constructor": "ResNet",
        "block": "BasicBlock",
        "layers": [2, 2, 2, 2],
        "stem_width": 4,
        "stem": "cifar",
        "feature_dim": 32,
    }
    assert meta["projection_head"]["in_dim"] == 32
    from safetensors.numpy import load_file

    assert int(load_file(out["encoder"])["bn1.num_batches_tracked"]) == 3


def test_wrong_depth_in_export_json_names_the_problem():
    shapes = variable_shapes(model_config(18, "cifar", 4), 8)
    params, stats = shapes["params"]["encoder"], shapes["batch_stats"]["encoder"]
    with pytest.raises(ValueError, match="not those of a ResNet-34"):
        export_torch.encoder_state_dict(params, stats, 34)


def test_export_torch_mode_uses_the_workdir_export_or_init_from(tmp_path):
    from simclr_jax import config_base, modes

    torch_modules()
    mc = model_config(18, "cifar", 4)
    run = tmp_path / "run"
    checkpoint.export_encoder(
        str(run / "export"), random_variables(mc, 8), mc.to_dict(), {"step": 1, "config": {}}
    )
    config = config_base.base_config()  # a run's whole config, as the command line gives it
    paths = modes.run("export_torch", config, str(run), False)
    assert paths["encoder"] == str(run / "export_torch" / "encoder.safetensors")
    config.init_from = str(run / "export")
    paths = modes.run("export_torch", config, str(tmp_path / "other"), False)
    assert paths["model"] == str(tmp_path / "other" / "export_torch" / "model.json")
    export_torch.load_torch(str(tmp_path / "other" / "export_torch"))


def test_a_format_1_export_reads_with_the_keys_it_predates(tmp_path):
    """Exports written before sk_ratio / compat / head_out_scale existed meant their defaults."""
    mc = model_config(18, "cifar", 4)
    path = checkpoint.export_encoder(
        str(tmp_path / "e"), random_variables(mc, 8), mc.to_dict(), {"step": 3, "config": {}}
    )
    meta_path = os.path.join(path, "export.json")
    meta = json.load(open(meta_path))
    assert meta["format_version"] == checkpoint.EXPORT_FORMAT_VERSION == 2
    for key in ("sk_ratio", "compat", "head_out_scale"):
        del meta["model"][key]
    json.dump({**meta, "format_version": 1}, open(meta_path, "w"))
    _, read = checkpoint.load_export(path)
    assert read["format_version"] == 2
    assert (read["model"]["sk_ratio"], read["model"]["compat"]) == (0.0, "torchvision")
    assert read["model"]["head_out_scale"] is True
    json.dump({**meta, "format_version": 3}, open(meta_path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="format 3 by a newer simclr_jax"):
        checkpoint.load_export(path)
