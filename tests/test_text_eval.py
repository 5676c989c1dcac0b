"""The text encoder's end-of-run measures: STS Spearman, the probe, the deduplicated inputs."""

import numpy as np
import pytest
from tiny import load_config

pytest.importorskip("tokenizers")

from simclr_jax.data import text_eval_data, tokenizer  # noqa: E402
from simclr_jax.evals import text_eval  # noqa: E402


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 (no ties in these tests)."""
    return np.argsort(np.argsort(x)).astype(np.float64)


def test_sts_spearman_is_the_rank_correlation_of_cosines():
    rng = np.random.default_rng(0)
    f1, f2, gold = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)), rng.normal(size=30)
    cos = np.sum(f1 * f2, 1) / np.linalg.norm(f1, axis=1) / np.linalg.norm(f2, axis=1)
    a, b = _ranks(cos) - 14.5, _ranks(gold) - 14.5
    want = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
    assert text_eval.sts_spearman(f1 * 3.0, f2, gold) == pytest.approx(want, abs=1e-12)


def test_the_probe_scores_a_split_or_cross_validates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = (x[:, 0] > 0).astype(np.int32)  # linearly separable on one feature
    assert text_eval.probe_accuracy((x, y), None, 0) >= 0.95
    assert text_eval.probe_accuracy((x[:160], y[:160]), (x[160:], y[160:]), 0) >= 0.95
    noise = rng.integers(0, 2, 200)  # labels unrelated to the features: near chance
    assert 0.3 <= text_eval.probe_accuracy((x, noise), None, 0) <= 0.7


def test_text_inputs_encode_each_text_once_and_index_the_pairs():
    c = load_config("clear_text")
    c.model.max_len = 32
    s1, s2, gold = text_eval_data.sts_pairs(c, "lee")
    texts, _ = text_eval_data.probe_texts(c, "polarity", "all")
    tok = tokenizer.train_tokenizer([*s1[:100], *texts], 300)
    inputs = text_eval.text_inputs(c, tok)
    assert len(inputs["tokens"]) == 50 + 200  # the 50 Lee documents, the 200 sentences
    assert len(inputs["sts1"]) == len(gold) == 1225 and len(inputs["test"]) == 0  # polarity: CV
    assert len(inputs["train"]) == 200 and sorted(np.bincount(inputs["train_labels"])) == [100, 100]
    row = tokenizer.encode(tok, [s2[7]], 32)[0][0]
    np.testing.assert_array_equal(inputs["tokens"][inputs["sts2"][7]], row)


@pytest.mark.parametrize("mode", ["preview_augment", "distill"])
def test_image_only_modes_refuse_a_text_dataset_in_one_line(mode, tmp_path):
    from simclr_jax import modes

    c = load_config("clear_text")
    c.distill.teacher = str(tmp_path)
    with pytest.raises(ValueError, match="is text"):
        modes.run(mode, c, str(tmp_path / "run"), False)


def test_centring_subtracts_the_features_mean():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(40, 16)) + 50.0  # a common offset: every cosine near 1
    c = text_eval.centred(f)
    np.testing.assert_allclose(c.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(c, f - f.mean(0), atol=0)


def _config_with_given_tokenizer(tmp_path, vocab_size):
    """configs/clear_text.py on polarity with `model.vocab_size`, naming a 150-token tokenizer."""
    c = load_config("clear_text")
    c.dataset, c.model.vocab_size = "polarity", vocab_size
    given = str(tmp_path / "given.json")
    texts, _ = text_eval_data.probe_texts(c, "polarity", "all")
    tokenizer.save(tokenizer.train_tokenizer(texts, 150), given)
    c.data.tokenizer = given
    return c, given


def test_a_new_run_copies_a_given_tokenizer_and_resolves_data_tokenizer(tmp_path):
    from simclr_jax.pretrain import train

    c, given = _config_with_given_tokenizer(tmp_path, 200)
    resolved, tok = train.text_tokenizer(c, str(tmp_path / "run"))
    copied = str(tmp_path / "run" / "tokenizer.json")
    assert resolved.data.tokenizer == copied and c.data.tokenizer == given  # the caller's kept
    assert open(copied).read() == open(given).read() and tok.get_vocab_size() <= 150


def test_a_given_tokenizer_larger_than_the_model_is_refused_before_it_is_copied(tmp_path):
    from simclr_jax.pretrain import train

    c, _ = _config_with_given_tokenizer(tmp_path, 50)
    with pytest.raises(ValueError, match="more than model.vocab_size=50"):
        train.text_tokenizer(c, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "tokenizer.json").exists()
