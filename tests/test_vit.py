"""The ViT encoder: parameter counts, layout, sin-cos and resized position embeddings, config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny import init, tiny_config

from simclr_jax import config_base, models, optim
from simclr_jax.config import resume
from simclr_jax.models import vit


def _shapes(variant, image_size, **kw):
    """Abstract params of `variant` at `image_size` (jax.eval_shape: nothing allocated)."""
    enc = vit.build_vit(variant, **kw)
    x = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: enc.init(jax.random.key(0), x, train=False))["params"]


def _count(tree):
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "variant, count",
    # torchvision's vit_b_16 / vit_l_16 (86,567,656 / 304,326,632) minus the 1000-class head.
    [("B/16", 86_567_656 - (768 * 1000 + 1000)), ("L/16", 304_326_632 - (1024 * 1000 + 1000))],
)
def test_parameter_counts_equal_torchvisions(variant, count):
    shapes = _shapes(variant, 224)
    assert _count(shapes) == count
    width = vit.VIT_SIZES[variant[0]][0]
    assert shapes["embedding"]["kernel"].shape == (16, 16, 3, width)
    assert shapes["embedding"]["bias"].shape == (width,)
    assert shapes["pos_embedding"].shape == (1, 197, width)  # the class token + 14 x 14
    assert shapes["cls"].shape == (1, 1, width)
    blocks = vit.VIT_SIZES[variant[0]][1]
    assert sorted(shapes["Transformer"]) == sorted(
        [f"encoderblock_{i}" for i in range(blocks)] + ["encoder_norm"]
    )


def test_gap_and_sincos_variants_drop_what_they_do_not_use():
    b16 = _count(_shapes("B/16", 224))
    assert _count(_shapes("B/16", 224, pool="gap")) == b16 - 768 - 768  # no cls, no its posemb
    sincos = _shapes("B/16", 224, posemb="sincos2d")
    assert "pos_embedding" not in sincos and _count(sincos) == b16 - 197 * 768


def test_variant_spelling_and_config_checks_are_one_line_errors():
    assert vit.parse_variant("S/4") == ((384, 12, 1536, 6), 4)
    for bad in ("B16", "X/16", "B/0", "b/16"):
        with pytest.raises(ValueError, match="model.variant="):
            vit.parse_variant(bad)
    c = tiny_config()
    c.model.name, c.model.variant = "vit", "mu/4"
    config_base.validate_config(c)
    for key, value, message in [
        ("variant", "Q/4", "model.variant='Q/4'"),
        ("variant", "mu/3", "config.augment.image_size=8 is invalid: a multiple of .*patch 3"),
        ("pool", "map", "config.model.pool='map' is invalid: tok/gap"),
        ("posemb", "sin", "config.model.posemb='sin' is invalid: learn/sincos2d"),
        ("name", "convnext", "config.model.name='convnext' is invalid: resnet/vit"),
    ]:
        bad = c.copy_and_resolve_references()
        bad.model[key] = value
        with pytest.raises(config_base.ConfigError, match=message):
            config_base.validate_config(bad)


def test_sincos_embedding_equals_the_formula():
    h, w, d, t = 3, 4, 8, 10_000.0
    got = vit.posemb_sincos_2d(h, w, d)
    for r in range(h):
        for c in range(w):
            for i in range(d // 4):
                omega = t ** -(i / (d // 4 - 1))
                row = got[r * w + c]
                want = [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
                np.testing.assert_allclose(row[i :: d // 4], want, rtol=1e-6, atol=1e-6)


def test_resampled_posemb_equals_torch_bilinear_and_keeps_the_class_token():
    import torch

    rng = np.random.default_rng(0)
    pe = rng.standard_normal((1, 1 + 4 * 4, 6)).astype(np.float32)
    got = np.asarray(vit.resample_posemb(jnp.asarray(pe), 1, 7, 7))
    grid = torch.from_numpy(pe[0, 1:].reshape(4, 4, 6)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(grid, (7, 7), mode="bilinear", align_corners=False)
    want = want[0].permute(1, 2, 0).reshape(49, 6).numpy()
    np.testing.assert_array_equal(got[0, 0], pe[0, 0])
    # fp32 bilinear weights: each output is a convex mix of 4 inputs of magnitude ~3.
    np.testing.assert_allclose(got[0, 1:], want, atol=1e-5)
    assert vit.resample_posemb(jnp.asarray(pe), 1, 4, 4) is not None
    np.testing.assert_array_equal(np.asarray(vit.resample_posemb(jnp.asarray(pe), 1, 4, 4)), pe)


def test_an_encoder_pretrained_at_8px_runs_at_16px_on_its_resized_grid():
    enc = vit.build_vit("mu/4")
    x8 = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    variables = init(enc, jax.random.key(0), x8, train=False)
    assert variables["params"]["pos_embedding"].shape == (1, 1 + 2 * 2, 16)
    x16 = jax.image.resize(x8, (2, 16, 16, 3), "nearest")
    apply = jax.jit(lambda v, x: enc.apply(v, x, train=False))  # eager op-by-op: 10x the time
    feats = apply(variables, x16)
    # By hand: the same network with the 4 x 4 grid it resizes to as its own embedding.
    pe = vit.resample_posemb(variables["params"]["pos_embedding"], 1, 4, 4)
    own = jax.tree.map(lambda a: a, variables)
    own["params"]["pos_embedding"] = pe
    np.testing.assert_array_equal(feats, apply(own, x16))
    # An export records the grid: the encoder it describes inits with that grid at any size.
    described = models.describe_encoder(
        {"name": "vit", "variant": "mu/4", "dtype": "float32"}, variables["params"]
    )
    assert described["posemb_grid"] == 2
    shapes = jax.eval_shape(
        lambda: models.create_encoder(ml_collections.ConfigDict(described)).init(
            jax.random.key(0), x16, train=False
        )
    )
    assert shapes["params"]["pos_embedding"].shape == (1, 5, 16)


def test_bf16_compute_keeps_fp32_params_and_features_close_to_fp32():
    c = ml_collections.ConfigDict({"name": "vit", "variant": "mu/4", "dtype": "bfloat16"})
    enc16 = models.create_encoder(c)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
    variables = init(enc16, jax.random.key(0), x, train=False)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    f16 = jax.jit(lambda v: enc16.apply(v, x, train=False))(variables)
    f32 = jax.jit(lambda v: vit.build_vit("mu/4").apply(v, x, train=False))(variables)
    assert f16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (2^-8 relative) through ~6 matmuls before the final fp32 LN.
    np.testing.assert_allclose(f16, f32, atol=0.1)
    assert not np.array_equal(f16, f32)


def test_weight_decay_reaches_kernels_only():
    """big_vision's and MoCo v3's rule: no decay on LayerNorm, biases, class token, posemb."""
    mask = optim.decay_mask(_shapes("mu/4", 8))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted(
        [
            "['embedding']['kernel']",
            *(
                f"['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']['{n}']['kernel']"
                for n in ("query", "key", "value", "out")
            ),
            "['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']",
            "['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_1']['kernel']",
        ]
    )


def test_a_workdir_saved_before_the_vit_keys_resumes():
    new = config_base.base_config()
    saved = new.to_dict()
    for key in ("name", "variant", "pool", "posemb", "posemb_grid"):
        del saved["model"][key]
    assert resume.config_diff(saved, new.to_dict(), new.to_dict(), ()) == []


def test_distillation_checks_a_vit_by_its_patch():
    from simclr_jax.evals import distill_teacher

    m = ml_collections.ConfigDict({"name": "vit", "variant": "S/4", "stem": "imagenet"})
    assert distill_teacher.total_stride(m) == 4
    distill_teacher.check_fits(m, 32, "the student")
    with pytest.raises(ValueError, match=r"the student \(ViT-S/4\) cuts 4 px patches: the 30 px"):
        distill_teacher.check_fits(m, 30, "the student")
