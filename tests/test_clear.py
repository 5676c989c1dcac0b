"""CLEAR: the sentence augmentations by hand, BERT's mask, the method's step on 8 and 1 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_trees_close, fp32_rtol

from simclr_jax import augment_text as at
from simclr_jax import config_base
from simclr_jax.config.checks import ConfigError
from simclr_jax.methods import clear
from simclr_jax.pretrain import state as pretrain_state
from simclr_jax.runtime import parallel

L = 16
# [CLS] w0 w1(2 tokens) w2 w3 w4(3 tokens) w5 w6 [SEP] [PAD]...: 7 words, 10 tokens.
GROUPS = [[10], [11, 12], [13], [14], [15, 16, 17], [18], [19]]


def _example(groups=GROUPS, length=L):
    tokens = [at.CLS] + [t for g in groups for t in g] + [at.SEP]
    words = [-1] + [i for i, g in enumerate(groups) for _ in g] + [-1]
    pad = length - len(tokens)
    return (
        jnp.asarray(tokens + [at.PAD] * pad, jnp.int32),
        jnp.asarray(words + [-1] * pad, jnp.int32),
    )


def _groups(tokens, words):
    """The packed form checked, then the tokens of each word, in order."""
    t, w = np.asarray(tokens), np.asarray(words)
    n_tok = int(np.sum(t != at.PAD))
    assert t[0] == at.CLS and t[n_tok - 1] == at.SEP and w[0] == w[n_tok - 1] == -1
    assert np.all(t[n_tok:] == at.PAD) and np.all(w[n_tok:] == -1)
    body_t, body_w = t[1 : n_tok - 1], w[1 : n_tok - 1]
    assert np.all(np.diff(body_w) >= 0) and (body_w.size == 0 or body_w[0] == 0)
    assert np.all(np.diff(np.unique(body_w)) == 1)  # words renumbered 0, 1, ...
    return [list(body_t[body_w == i]) for i in range(int(body_w.max(initial=-1)) + 1)]


@pytest.mark.parametrize("ratio", [0.3, 0.6, 1.0])
def test_word_deletion_replaces_each_deleted_word_by_one_del(ratio):
    t, w = _example()
    for seed in range(6):
        out = _groups(*at.word_deletion(jax.random.key(seed), t, w, ratio))
        assert len(out) == len(GROUPS)  # one [DEL] per deleted word: kept order, kept words
        deleted = [i for i, g in enumerate(out) if g == [at.DEL]]
        assert all(out[i] == GROUPS[i] for i in range(len(GROUPS)) if i not in deleted)
        assert len(deleted) == min(round(ratio * 7), 6)  # at least one word is kept


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_span_deletion_drops_one_span_for_one_del(ratio):
    t, w = _example()
    k = min(round(ratio * 7), 6)
    starts = set()
    for seed in range(8):
        out = _groups(*at.span_deletion(jax.random.key(seed), t, w, ratio))
        s = out.index([at.DEL])
        assert out == GROUPS[:s] + [[at.DEL]] + GROUPS[s + k :]
        starts.add(s)
    assert len(starts) > 1 or k == 6  # the span moves with the key


@pytest.mark.parametrize("ratio", [0.3, 0.6, 1.0])
def test_reordering_swaps_two_equal_spans(ratio):
    t, w = _example()
    m = min(round(ratio * 7 / 2), 3)
    for seed in range(6):
        t2, w2 = at.reordering(jax.random.key(seed), t, w, ratio)
        out = _groups(t2, w2)
        assert sorted(np.asarray(t2).tolist()) == sorted(np.asarray(t).tolist())  # multiset
        swaps = [
            GROUPS[:a] + GROUPS[b : b + m] + GROUPS[a + m : b] + GROUPS[a : a + m] + GROUPS[b + m :]
            for a in range(7)
            for b in range(a + m, 7 - m + 1)
        ]
        assert out in swaps and out != GROUPS


def test_substitution_takes_listed_synonyms_of_one_token_words():
    t, w = _example()
    # 11 starts a two-token word: never substituted; 10, 13, 18 are one-token words.
    table = at.synonym_table({10: [30, 31], 11: [32], 13: [33, 13, 2], 18: [34]}, 64, 4)
    np.testing.assert_array_equal(table[13], [33, -1, -1, -1])  # itself and specials dropped
    for seed in range(6):
        t2, w2 = at.synonym_substitution(jax.random.key(seed), t, w, jnp.asarray(table), 1.0)
        np.testing.assert_array_equal(w2, w)
        changed = np.flatnonzero(np.asarray(t2) != np.asarray(t))
        assert len(changed) == 3  # every eligible word at ratio 1
        for j in changed:
            assert int(t2[j]) in table[int(t[j])] and int(t[j]) in (10, 13, 18)
    # Ratio 3/7: round(3) words of the 7 asked, only 3 eligible: at most 3 change.
    t3, _ = at.synonym_substitution(jax.random.key(0), t, w, jnp.asarray(table), 2 / 7)
    assert int(np.sum(np.asarray(t3) != np.asarray(t))) == 2
    with pytest.raises(ValueError, match="synonym id 99 is outside the vocabulary"):
        at.synonym_table({10: [99]}, 64, 4)


def test_ratio_zero_is_the_identity_and_short_sentences_survive():
    table = jnp.asarray(at.synonym_table({10: [30]}, 64, 2))
    for groups in (GROUPS, [[10]], []):
        t, w = _example(groups)
        for fn, args in [
            (at.word_deletion, ()),
            (at.span_deletion, ()),
            (at.reordering, ()),
            (at.synonym_substitution, (table,)),
        ]:
            t2, w2 = fn(jax.random.key(1), t, w, *args, 0.0)
            np.testing.assert_array_equal(t2, t)
            np.testing.assert_array_equal(w2, w)
            # Full ratio on one or no word: still a well-formed sentence.
            _groups(*fn(jax.random.key(1), t, w, *args, 1.0))


def _clear_config(**kw):
    c = clear.config_defaults()
    for k, v in kw.items():
        c[k] = v
    return c


def test_views_jit_vmap_and_determinism():
    rng = np.random.default_rng(0)
    batch = [_example([[int(x)] for x in rng.integers(6, 64, n)]) for n in (1, 3, 7, 12)]
    tokens, words = (jnp.stack(a) for a in zip(*batch, strict=True))
    cfg = _clear_config(augmentations=("del_span", "reorder", "del_word"))
    fn = jax.jit(lambda k, t, w: at.clear_views(k, t, w, cfg))
    v = fn(jax.random.key(3), tokens, words)
    assert v.shape == (2, 4, L) and v.dtype == jnp.int32
    np.testing.assert_array_equal(v, fn(jax.random.key(3), tokens, words))  # same key
    assert not np.array_equal(v, fn(jax.random.key(4), tokens, words))
    assert not np.array_equal(v[0], v[1])  # the two views differ
    # Each row is the un-jitted, un-vmapped chain on that example with its own key.
    for view in range(2):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(3), view), 4)
        for i in range(4):
            want, _ = at.augment_example(keys[i], tokens[i], words[i], cfg)
            np.testing.assert_array_equal(v[view, i], want)
            _groups(v[view, i], np.where(np.asarray(v[view, i]) > at.SEP, 0, -1))


def test_mlm_mask_proportions_are_berts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(6, 1000, (512, 64)).astype(np.int32)
    tokens[:, 0], tokens[:, -1], tokens[:, 50:60] = at.CLS, at.SEP, at.PAD
    tokens = jnp.asarray(tokens)
    inputs, targets, weights = at.mlm_mask(jax.random.key(0), tokens, 1000, 0.15)
    np.testing.assert_array_equal(targets, tokens)
    special = np.asarray(tokens) < at.NUM_SPECIAL
    chosen, inp, tok = np.asarray(weights) > 0, np.asarray(inputs), np.asarray(tokens)
    assert not np.any(chosen & special) and np.all(inp[~chosen] == tok[~chosen])

    def within(count, n, p):  # 5 binomial standard deviations
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (count, n, p)

    n_ordinary = int(np.sum(~special))
    within(int(chosen.sum()), n_ordinary, 0.15)
    k = int(chosen.sum())
    within(int(np.sum(inp[chosen] == at.MASK)), k, 0.8)
    # Unchanged: 10%, plus the random draws that hit the original (1 in 994).
    within(int(np.sum(inp[chosen] == tok[chosen])), k, 0.1 + 0.1 / 994)
    assert np.all(inp[chosen] >= at.MASK) and np.all(inp < 1000)


def test_validation_is_one_line():
    c = config_base.base_config()
    c.method, c.model.name, c.model.variant = "clear", "text", "mu"
    clear.validate(c)
    for key, value, message in [
        ("augmentations", ("del_word", "subs"), "without 'subs' unless clear.synonyms"),
        ("augmentations", ("shuffle",), "a non-empty tuple of"),
        ("augmentations", (), "a non-empty tuple of"),
        ("del_word_ratio", 1.5, "in \\[0, 1\\]"),
        ("temperature", 0.0, "> 0"),
        ("synonyms", "/nonexistent.tsv", "an existing 'word<TAB>syn1<TAB>syn2' file"),
    ]:
        bad = config_base.base_config()
        bad.method, bad.model.name, bad.model.variant = "clear", "text", "mu"
        bad.clear[key] = value
        with pytest.raises(ConfigError, match=message) as e:
            clear.validate(bad)
        assert "\n" not in str(e.value)
    c.model.name = "vit"
    with pytest.raises(ConfigError, match="'text' with config.method='clear'"):
        clear.validate(c)


def test_synonym_file_to_ids(tmp_path):
    path = tmp_path / "syn.tsv"
    path.write_text("Big\tlarge\thuge\nsmall\tlittle\tunknownword\nnothing\n", encoding="utf-8")
    vocab = {"big": 10, "large": 11, "huge": 12, "small": 13, "little": 14}
    assert clear.synonym_ids(str(path), vocab.get) == {10: [11, 12], 13: [14]}


# The step: 'mu' text encoder, L = 16, vocabulary 64, batch 8.
BATCH, VOCAB = 8, 64


def _config(lr=0.5):
    c = config_base.base_config()
    c.method, c.batch_size, c.total_steps, c.seed = "clear", BATCH, 20, 0
    m = c.model
    m.name, m.variant, m.vocab_size, m.max_len, m.pool = "text", "mu", VOCAB, L, "gap"
    m.head_hidden_dim, m.head_out_dim = 16, 8
    # SGD, not AdamW: Adam's first update is +-lr on the sign of a gradient that rounding noise
    # decides where it is ~0, so 8 devices and 1 would differ by 2 lr there (see test_mocov3).
    c.optim.name, c.optim.base_lr, c.optim.lr_scaling = "sgd", lr, "none"
    c.optim.weight_decay, c.optim.warmup_epochs = 0.0, 0.0
    c.clear.temperature = 0.5
    c.monitor_every_steps = 1000
    return c


def _batch():
    rng = np.random.default_rng(1)
    rows = [_example([[int(x)] for x in rng.integers(6, VOCAB, n)]) for n in (3, 5, 7, 9) * 2]
    tokens, words = (np.stack([np.asarray(r[i]) for r in rows]) for i in range(2))
    return {"tokens": tokens, "words": words, "label": np.array([0, 1, -1, 2] * 2, np.int32)}


def _state_and_step(config, devices):
    mesh = parallel.make_mesh(devices)
    model, tx, schedule = pretrain_state.model_and_optimizer(config, 3, 10)
    state = pretrain_state.create_train_state(config, model, tx, mesh, num_train_examples=80)
    step = pretrain_state.compile_train_step(
        config, model, tx, schedule, mesh, num_train_examples=80
    )
    init = lambda: pretrain_state.create_train_state(  # noqa: E731  (a fresh state)
        config, model, tx, mesh, num_train_examples=80
    )
    return mesh, state, step, init


@pytest.fixture(scope="module")
def eight():
    config = _config()
    return config, _state_and_step(config, jax.devices())


def test_sharded_step_equals_one_device(eight):
    config, (mesh8, state8, step8, _) = eight
    assert len(jax.devices()) == 8
    mesh1, state1, step1, _ = _state_and_step(config, jax.devices()[:1])
    batch = _batch()
    before = jax.device_get(state1.params)
    new8, m8 = step8(state8, parallel.host_to_global(batch, mesh8))
    new1, m1 = step1(state1, parallel.host_to_global(batch, mesh1))
    m8, m1 = jax.device_get(m8), jax.device_get(m1)
    # Every device's rows differ: the gradient must sum all of them (and the BN statistics).
    p8, p1 = jax.device_get(new8.params), jax.device_get(new1.params)
    # The attention key's bias has an exactly-zero gradient (a softmax ignores a shift common
    # to a query's logits): its change is rounding noise, checked against the kernel's scale.
    attn = ("encoder", "Transformer", "encoderblock_0", "MultiHeadDotProductAttention_0")
    biases = []
    for tree in (p8, p1, before):
        node = tree
        for k in attn:
            node = node[k]
        biases.append(node["key"].pop("bias"))
    kernel_scale = np.max(np.abs(p1[attn[0]][attn[1]][attn[2]][attn[3]]["query"]["kernel"]))
    for b in biases[:2]:
        np.testing.assert_allclose(b, biases[2], atol=fp32_rtol(3 * BATCH * L, 16) * kernel_scale)
    assert_trees_close(p8, p1, reduction_len=3 * BATCH * L, depth=16, before=before)
    assert_trees_close(
        jax.device_get(new8.batch_stats),
        jax.device_get(new1.batch_stats),
        reduction_len=2 * BATCH,
        depth=8,
    )
    assert np.isfinite(m8["loss"]) and m8["mlm_loss"] > 0
    # At init: MLM near chance, log(vocab); NT-Xent at most about chance, log(2B - 1) (two
    # views of one sentence already have close features under a random encoder).
    assert abs(m8["mlm_loss"] - math.log(VOCAB)) < 0.5
    assert 0 < m8["contrastive_loss"] < math.log(2 * BATCH - 1) + 0.5
    # Same views and masks on both meshes; sums over <= 16 views x 16 tokens, ~8 stacked sums.
    tol = fp32_rtol(16 * 16, 8)
    for key in ("loss", "contrastive_loss", "mlm_loss", "mlm_acc", "contrastive_acc", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=tol, atol=tol, err_msg=key)
    np.testing.assert_allclose(
        m8["loss"], m8["contrastive_loss"] + config.clear.mlm_weight * m8["mlm_loss"], rtol=1e-6
    )
    assert {"linear_loss", "linear_acc", "lr", "param_norm"} <= set(m8)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(eight):
    config, (mesh8, _, step8, init) = eight
    state = init()  # the fixture's state was donated to the other test's step
    batch = parallel.host_to_global(_batch(), mesh8)
    losses = []
    for _ in range(12):
        state, m = step8(state, batch)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


def test_model_outputs_mlm_logits_for_the_masked_rows():
    config = _config()
    model = clear.build_model(config, 3)
    x = jnp.zeros((6, L), jnp.int32)  # 2 examples x 3 rows; shapes only (eval_shape)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:2], train=False))
    assert set(variables["params"]) == {"encoder", "head", "mlm_head", "linear_head"}
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False, mlm_every=3), variables)
    assert out["projection"].shape == (4, 8) and out["mlm_logits"].shape == (2, L, VOCAB)
    assert "mlm_logits" not in jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert clear.METHOD.modality == "text"


def test_synonym_state_through_a_trained_tokenizer(tmp_path):
    from simclr_jax.data import tokenizer

    texts = ["the big dog saw a large cat", "a huge dog and a small cat", "little cats"] * 20
    tok = tokenizer.train_tokenizer(texts, 64)
    tok_path, syn_path = str(tmp_path / "tokenizer.json"), tmp_path / "syn.tsv"
    tokenizer.save(tok, tok_path)
    syn_path.write_text("big\tlarge\thuge\ncat\tdog\n", encoding="utf-8")
    config = _config()
    config.clear.synonyms, config.clear.augmentations = str(syn_path), ("subs",)
    with pytest.raises(ConfigError, match="needs config.data.tokenizer"):
        clear.init_state(config, None, jax.random.key(0), 0)
    config.data.tokenizer = tok_path
    clear.validate(config)
    table = np.asarray(clear.init_state(config, None, jax.random.key(0), 0)["synonyms"])
    ids = {w: tok.token_to_id(w) for w in ("big", "large", "huge", "cat", "dog")}
    assert table.shape == (VOCAB, config.clear.max_synonyms)
    for head, syns in (("big", ["large", "huge"]), ("cat", ["dog"])):
        if ids[head] is not None:  # a word the tiny vocabulary holds as one token
            row = [i for i in table[ids[head]] if i >= 0]
            assert row == [ids[w] for w in syns if ids[w] is not None]
    assert (table >= 0).sum() > 0


def test_mlm_positions_are_the_chosen_ones_in_order_padded_with_weight_zero():
    targets = jnp.array([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0]], jnp.int32)
    weights = jnp.array([[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.float32)
    pos, tgt, w = at.mlm_positions(targets, weights, 3)
    assert pos[0, :2].tolist() == [1, 3] and w[0].tolist() == [1.0, 1.0, 0.0]
    assert tgt[0, :2].tolist() == [10, 12]
    assert w[1].tolist() == [0.0, 0.0, 0.0]
    assert at.mlm_num_positions(64, 0.15) == 20
    assert at.mlm_num_positions(4, 0.9) == 4
