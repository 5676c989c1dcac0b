"""The text Transformer: masked pads, parameter count by formula, config, MLM head, dummy input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tolerances import fp32_atol

from simclr_jax import config_base, models
from simclr_jax.config import schema
from simclr_jax.config.checks import ConfigError
from simclr_jax.models import text, vit

VOCAB, MAX_LEN = 64, 16


def _model_config(**kw):
    c = config_base.base_config().model
    c.name, c.variant, c.vocab_size, c.max_len = "text", "mu", VOCAB, MAX_LEN
    for k, v in kw.items():
        c[k] = v
    return c


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _sentences(rng, n, length, tail):
    """`[CLS] t.. [SEP]` then `tail(...)` filling the rest: pads, or any ids after [SEP]."""
    out = np.zeros((n, length), np.int32)
    for i in range(n):
        k = int(rng.integers(1, 7))
        out[i, 0], out[i, 1 : 1 + k], out[i, 1 + k] = 2, rng.integers(6, VOCAB, k), 3
        out[i, 2 + k :] = tail(rng, length - 2 - k)
    return out


@pytest.mark.parametrize("pool", ["gap", "tok"])
def test_what_follows_sep_changes_no_feature(pool):
    enc = models.create_encoder(_model_config(pool=pool))
    rng = np.random.default_rng(0)
    padded = _sentences(rng, 4, MAX_LEN, lambda r, n: np.zeros(n, np.int32))
    junk = padded.copy()
    after = np.cumsum(padded == 3, axis=1) - (padded == 3) > 0
    junk[after] = rng.integers(1, VOCAB, int(after.sum()))  # ids, [SEP] and [CLS] included
    variables = enc.init(jax.random.key(0), jnp.asarray(padded), train=False)
    f_pad, local = enc.apply(variables, jnp.asarray(padded), train=False, with_local=True)
    f_junk = enc.apply(variables, jnp.asarray(junk), train=False)
    assert local.shape == (4, MAX_LEN, 16) and f_pad.shape == (4, 16)
    # Masked keys get weight exactly 0: the same sums on both, bit for bit.
    np.testing.assert_array_equal(f_pad, f_junk)
    # A shorter padding (L = 10): the same sums up to the order of the masked zeros.
    short = enc.apply(variables, jnp.asarray(padded[:, :10]), train=False)
    np.testing.assert_allclose(short, f_pad, rtol=0, atol=fp32_atol(f_pad, 16, 8))
    # Not vacuous: another sentence gives another feature.
    other = enc.apply(variables, jnp.asarray(padded[::-1]), train=False)
    assert float(np.max(np.abs(other - f_pad))) > 1e-3
    if pool == "gap":  # the mean of the sentence tokens' outputs, by hand
        valid = np.asarray(text.token_mask(jnp.asarray(padded)))
        want = (np.asarray(local) * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
        np.testing.assert_allclose(f_pad, want, rtol=0, atol=fp32_atol(want, MAX_LEN))
    else:
        np.testing.assert_array_equal(f_pad, np.asarray(local)[:, 0])


def test_token_mask_stops_at_the_first_sep():
    tokens = jnp.array([[2, 7, 3, 9, 3, 0], [2, 3, 0, 0, 0, 0]])
    want = [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    np.testing.assert_array_equal(text.token_mask(tokens), np.array(want, bool))


def test_parameter_count_by_formula_and_the_vit_block_names():
    d, depth, m, _ = vit.VIT_SIZES["mu"]
    enc = models.create_encoder(_model_config())
    shapes = jax.eval_shape(
        lambda: enc.init(jax.random.key(0), jnp.zeros((2, MAX_LEN), jnp.int32), train=False)
    )["params"]
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)  # 2 LN, q/k/v/out, MLP
    assert _count(shapes) == VOCAB * d + MAX_LEN * d + depth * block + 2 * d
    assert shapes["embedding"]["embedding"].shape == (VOCAB, d)
    assert shapes["pos_embedding"].shape == (1, MAX_LEN, d)
    assert sorted(shapes["Transformer"]) == ["encoder_norm", "encoderblock_0"]
    mlm = models.MlmHead(VOCAB)
    mlm_shapes = jax.eval_shape(lambda: mlm.init(jax.random.key(0), jnp.zeros((1, 3, d))))
    assert _count(mlm_shapes) == (d * d + d) + 2 * d + (d * VOCAB + VOCAB)


def test_config_label_dim_and_one_line_errors():
    m = _model_config()
    assert models.encoder_label(m) == "Text-mu" and models.encoder_feature_dim(m) == 16
    assert models.encoder_feature_dim({"name": "text", "variant": "S"}) == 384
    dummy = models.dummy_input(m, 224)
    assert dummy.shape == (2, MAX_LEN) and dummy.dtype == jnp.int32
    assert models.dummy_input(ml_collections.ConfigDict({"name": "vit"}), 8).shape == (2, 8, 8, 3)
    # The schema's checks (config_base adds the dataset/method modality check on top).
    c = config_base.base_config()
    c.model = m
    schema.validate_shared(c)
    for key, value, message in [
        ("variant", "S/16", "model.variant='S/16' is not a text encoder size"),
        ("pool", "max", "model.pool='max' is not one of"),
        ("vocab_size", 6, "model.vocab_size=6 must be an integer > 6"),
        ("max_len", 2, "model.max_len=2 must be an integer >= 3"),
    ]:
        bad = config_base.base_config()
        bad.model = _model_config(**{key: value})
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
            schema.validate_shared(bad)
        assert "\n" not in str(e.value)
    enc = models.create_encoder(m)
    with pytest.raises(ValueError, match="17 tokens per example exceed model.max_len=16"):
        enc.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


def test_init_variables_builds_a_text_model_from_its_dummy():
    m = _model_config()
    enc = models.create_encoder(m)
    v = models.init_variables(enc, jax.random.key(0), 224, m)
    assert v["batch_stats"] == {} and v["params"]["pos_embedding"].shape == (1, MAX_LEN, 16)


def test_the_pure_layers_special_ids_equal_the_tokenizers():
    from simclr_jax import augment_text
    from simclr_jax.data import tokenizer
    from simclr_jax.models import text

    ids = [tokenizer.PAD_ID, tokenizer.UNK_ID, tokenizer.CLS_ID, tokenizer.SEP_ID]
    ids += [tokenizer.MASK_ID, tokenizer.DEL_ID]
    at = augment_text
    assert ids == [at.PAD, at.UNK, at.CLS, at.SEP, at.MASK, at.DEL] == list(range(6))
    assert (text.PAD_ID, text.SEP_ID) == (tokenizer.PAD_ID, tokenizer.SEP_ID)
    assert text.NUM_SPECIAL == at.NUM_SPECIAL == len(tokenizer.SPECIAL_TOKENS)
