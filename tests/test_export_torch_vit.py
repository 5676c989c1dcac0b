"""ViT export to torchvision's VisionTransformer: strict load and the same features as JAX."""

import os

import jax
import numpy as np
import pytest
from test_export_torch import encoder_and_head, jax_outputs, randomize, rel_err, torch_modules
from tolerances import fp32_rtol

from simclr_jax import checkpoint, config_base
from simclr_jax.interop import export_torch, export_torch_vit

# The longest sum is the patch embedding's 4*4*3 = 48 terms or the MLP's 32; about 12 stacked
# reductions (embedding, 2 x LayerNorm mean + var, q/k/v, attention, out, 2 MLP, final LN).
FEATURE_RTOL = fp32_rtol(48, 12)


def vit_model(posemb="learn", pool="tok"):
    """An export's `model` dict for torchvision's tiny twin: 1 layer, 2 heads, width 16, mlp 32."""
    mc = config_base.base_config().model
    mc.name, mc.variant, mc.posemb, mc.pool = "vit", "mu/4", posemb, pool
    mc.head_hidden_dim, mc.head_out_dim = 32, 16
    mc.head_out_scale = True
    return mc


def random_variables(mc, image_size):
    """Random encoder + head variables; a ViT encoder has no `batch_stats` (LayerNorm only)."""
    encoder, head = encoder_and_head(mc)

    def init(key):
        x = jax.numpy.zeros((1, image_size, image_size, 3))
        ev = encoder.init(key, x, train=False)
        hv = head.init(key, encoder.apply(ev, x, train=False), train=False)
        cols = ("params", "batch_stats")
        return {c: {"encoder": ev.get(c, {}), "head": hv.get(c, {})} for c in cols}

    return randomize(jax.eval_shape(init, jax.random.key(0)), np.random.default_rng(0))


def export_and_compare(tmp_path, mc, image_size, batch=2):
    """Exports random variables, loads them in torch; (feature, projection) errors and meta."""
    torch, _ = torch_modules()
    variables = random_variables(mc, image_size)
    source = {"step": 7, "config": {"augment": {"image_size": image_size}}}
    path = checkpoint.export_encoder(
        str(tmp_path / "run" / "export"), variables, mc.to_dict(), source
    )
    paths = export_torch.export_torch(path)
    encoder, head, meta = export_torch.load_torch(os.path.dirname(paths["encoder"]))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch, image_size, image_size, 3)).astype(np.float32)
    features, projection = jax_outputs(mc, variables, images)
    with torch.no_grad():
        t_features = encoder(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        t_projection = head(torch.from_numpy(features.copy())).numpy()
    assert t_features.shape == features.shape == (batch, meta["torchvision"]["feature_dim"])
    assert np.std(features) > 1e-3  # non-degenerate features, so the comparison means something
    return rel_err(t_features, features), rel_err(t_projection, projection), meta


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_torchvision_vit_features_equal_jax(tmp_path, posemb):
    feat_err, proj_err, meta = export_and_compare(tmp_path, vit_model(posemb), 8)
    assert feat_err < FEATURE_RTOL and proj_err < 1e-4, (feat_err, proj_err)
    spec = meta["torchvision"]
    assert spec["constructor"] == "VisionTransformer" and spec["image_size"] == 8
    assert (spec["patch_size"], spec["num_layers"], spec["num_heads"]) == (4, 1, 2)
    assert (spec["hidden_dim"], spec["mlp_dim"]) == (16, 32)
    # The very model the brief names builds and loads it too (strict).
    _, torchvision = torch_modules()
    from safetensors.torch import load_file

    twin = torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    state = load_file(str(tmp_path / "run" / "export_torch" / export_torch.ENCODER_FILE))
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert missing == ["heads.head.weight", "heads.head.bias"] and unexpected == []


def test_standard_variants_name_torchvisions_constructors():
    for variant, name in [
        ("B/16", "vit_b_16"),
        ("L/16", "vit_l_16"),
        ("S/16", "VisionTransformer"),
    ]:
        model, params = {"variant": variant}, {"pos_embedding": np.zeros((1, 197, 1))}
        size = export_torch_vit.vit_image_size(model, params, 0)
        spec = export_torch_vit.torch_vit_spec(model, size)
        assert spec["constructor"] == name and spec["image_size"] == 224


def test_a_mean_pooled_vit_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"model.pool='gap'.*torchvision's VisionTransformer"):
        export_and_compare(tmp_path, vit_model(pool="gap"), 8)
    assert np.isfinite(FEATURE_RTOL)
