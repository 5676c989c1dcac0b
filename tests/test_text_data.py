"""The text input pipeline: line files, tokenizer, encoding, the stream's order, evaluation sets.

Each stream is checked against the one order (`streams.batch_indices`) and `tokenizer.encode` of
the texts it should hold; the tfds tasks run on `tfds.testing.mock_data`, which serves
`tfds.data_source` too (so the tfds_text stream reads it as it reads ArrayRecord).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from simclr_jax import config_base, data
from simclr_jax.data import streams, text_sources
from simclr_jax.data import tokenizer as T

LINES = [
    "The fire spread towards the town overnight.",
    "Residents were told to leave their homes.",
    "Police closed the highway near the river.",
    "The storm brought heavy rain to the coast.",
    "Officials said the damage was limited.",
    "A new blaze started north of the city.",
    "Firefighters worked through the night.",
    "The wind changed direction in the morning.",
    "Schools in the area will stay closed.",
    "The government promised more help.",
    "Crews expect the fire to burn for days.",
]


def _config(**data_keys):
    c = config_base.base_config()
    c.seed, c.batch_size = 3, 4
    c.data.prefetch = 0
    c.model.max_len, c.model.vocab_size = 12, 300
    for k, v in data_keys.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(LINES, 300)


@pytest.fixture
def folder(tmp_path):
    """11 examples in two files, with blank lines and an empty file between them."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("\n".join(LINES[:5]) + "\n\n   \n", encoding="utf-8")
    (root / "b.txt").write_text("\r\n".join(LINES[5:]), encoding="utf-8")  # no final break
    (root / "c.txt").write_text("\n \n", encoding="utf-8")
    (root / "notes.md").write_text("not an example\n", encoding="utf-8")
    return str(root)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_text_folder_stream_order_resume_and_hosts(folder, tok):
    c = _config(text_files=folder)
    c.dataset = "text_file"
    assert data.modality("text_file") == "text" and data.modality("digits") == "image"
    info = data.dataset_info(c)
    assert (info.num_train_examples, info.num_classes, info.image_size) == (11, 1, 0)
    fresh = _take(data.pretrain_iterator(c, process_index=0, process_count=1, tokenizer=tok), 7)
    for step, batch in enumerate(fresh):  # 2 steps an epoch: crosses 3 epochs
        index = streams.batch_indices(c.seed, 11, 4, step)
        tokens, words, _ = T.encode(tok, [LINES[i] for i in index], 12)
        np.testing.assert_array_equal(batch["tokens"], tokens)
        np.testing.assert_array_equal(batch["words"], words)
        np.testing.assert_array_equal(batch["label"], np.full(4, -1))
        assert batch["tokens"].dtype == batch["words"].dtype == np.int32
    c.data.prefetch = 2  # through the Prefetcher, as a run reads it
    resumed = data.pretrain_iterator(
        c, process_index=0, process_count=1, start_step=5, tokenizer=tok
    )
    for want, got in zip(fresh[5:], _take(resumed, 2), strict=True):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert isinstance(resumed.stats, data.TextStats)
    resumed.close()
    hosts = [
        _take(
            data.pretrain_iterator(
                c, process_index=p, process_count=2, start_step=3, with_index=True, tokenizer=tok
            ),
            2,
        )
        for p in range(2)
    ]
    for step, (h0, h1) in enumerate(zip(*hosts, strict=True), start=3):
        np.testing.assert_array_equal(
            np.concatenate([h0["tokens"], h1["tokens"]]), fresh[step]["tokens"]
        )
        np.testing.assert_array_equal(
            np.concatenate([h0["index"], h1["index"]]), streams.batch_indices(3, 11, 4, step)
        )


def test_encode_by_hand():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(T.SPECIAL_TOKENS)}
    for t in ("the", "fire", "spread", "##s", ",", "un", "##known", "."):
        vocab[t] = len(vocab)  # the=6 fire=7 spread=8 ##s=9 ,=10 un=11 ##known=12 .=13
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = ["The fire spreads.", "unknown, zebra", "the fire, the fire spreads"]
    tokens, words, truncated = T.encode(tok, texts, 8)
    np.testing.assert_array_equal(
        tokens,
        [
            [2, 6, 7, 8, 9, 13, 3, 0],  # [CLS] the fire spread ##s . [SEP] [PAD]
            [2, 11, 12, 10, 1, 3, 0, 0],  # [CLS] un ##known , [UNK] [SEP] ...
            [2, 6, 7, 10, 6, 7, 8, 3],  # 8 tokens, cut after 6 of them
        ],
    )
    np.testing.assert_array_equal(
        words,
        [
            [-1, 0, 1, 2, 2, 3, -1, -1],
            [-1, 0, 0, 1, 2, -1, -1, -1],
            [-1, 0, 1, 2, 3, 4, 5, -1],
        ],
    )
    assert truncated == 1
    with pytest.raises(ValueError, match="max_len=2"):
        T.encode(tok, texts, 2)


def test_tokenizer_round_trip_determinism_and_workdir(tmp_path):
    texts = list(text_sources.lee_news_sentences()[:400])
    a, b = T.train_tokenizer(texts, 600), T.train_tokenizer(texts, 600)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 600
    assert [a.id_to_token(i) for i in range(6)] == list(T.SPECIAL_TOKENS)
    # Normalised = lowercased; the decoder re-attaches '.', ',', '?', '!' (not quotes, brackets).
    for s in ["The fire spread towards Hill Top, police said.", "About 500 Residents LEFT."]:
        ids = a.encode(s).ids
        assert T.UNK_ID not in ids
        assert a.decode(ids) == s.lower()
    c = _config()
    c.model.vocab_size = 600
    calls = []

    def texts_fn():
        calls.append(1)
        return iter(texts)

    first = T.load_or_train(c, str(tmp_path), texts_fn)
    again = T.load_or_train(c, str(tmp_path), texts_fn)  # a resume: loaded, not retrained
    assert len(calls) == 1 and again.to_str() == first.to_str() == a.to_str()
    assert os.listdir(tmp_path) == [T.TOKENIZER_FILE]  # written by rename: no temporary left
    c.model.vocab_size = 100
    with pytest.raises(ValueError, match="600 tokens, more than model.vocab_size=100"):
        T.load_or_train(c, str(tmp_path), texts_fn)


def test_tfds_glue_tasks_and_stream(tok):
    tfds = data.import_tfds()
    with tfds.testing.mock_data(num_examples=10):
        records = [tfds.data_source("glue/sst2", split="train")[i] for i in range(10)]
        texts, labels = data.probe_texts(_config(), "sst2", "train")
        assert texts == [text_sources.as_str(r["sentence"]) for r in records]
        np.testing.assert_array_equal(labels, [int(r["label"]) for r in records])
        stsb = [tfds.data_source("glue/stsb", split="validation")[i] for i in range(10)]
        first, second, scores = data.sts_pairs(_config(), "stsb")
        assert second == [text_sources.as_str(r["sentence2"]) for r in stsb] and len(first) == 10
        np.testing.assert_allclose(scores, [r["label"] for r in stsb])
        assert scores.dtype == np.float32
        c = _config(tfds_name="glue/sst2")
        c.dataset = "tfds_text"
        info = data.dataset_info(c)
        assert (info.num_train_examples, info.num_classes) == (10, 2)
        batch = next(
            data.pretrain_iterator(c, process_index=0, process_count=1, start_step=4, tokenizer=tok)
        )
        index = streams.batch_indices(c.seed, 10, 4, 4)
        want, _, _ = T.encode(tok, [texts[i] for i in index], 12)
        np.testing.assert_array_equal(batch["tokens"], want)
        np.testing.assert_array_equal(batch["label"], labels[index])
        c.data.text_field = "text"
        with pytest.raises(ValueError, match="no feature data.text_field='text'.*'sentence'"):
            data.dataset_info(c)
        c.data.tfds_name, c.data.text_field = "glue/stsb", "sentence1"  # float scores: no classes
        assert data.dataset_info(c).num_classes == 1
        batch = next(
            data.pretrain_iterator(c, process_index=0, process_count=1, start_step=0, tokenizer=tok)
        )
        np.testing.assert_array_equal(batch["label"], np.full(4, -1))
    with pytest.raises(ValueError, match="no labelled split 'test'"):
        data.probe_texts(_config(), "sst2", "test")


def test_bundled_lee_and_polarity():
    first, second, scores = data.sts_pairs(_config(), "lee")
    assert len(first) == len(second) == len(scores) == 1225
    docs = text_sources.read_lines(text_sources.gensim_file("lee.cor"), "cp1252")
    # Pair 49 is (1, 2): row 1 of similarities0-1.txt reads "0 1 0.28 ...".
    assert (first[49], second[49], scores[49]) == (docs[1], docs[2], np.float32(0.28))
    assert (first[0], second[0], scores[0]) == (docs[0], docs[1], np.float32(0.3))
    assert any("£" in d for d in docs)  # decoded as Windows-1252
    texts, labels = data.probe_texts(_config(), "polarity", "all")
    assert len(texts) == 200 and np.bincount(labels).tolist() == [100, 100]
    assert texts[0] == "simplistic , silly and tedious ." and labels[0] == 0
    train, test = (data.probe_texts(_config(), "polarity", s) for s in ("train", "test"))
    assert np.bincount(train[1]).tolist() == [80, 80] and np.bincount(test[1]).tolist() == [20, 20]
    assert not set(train[0]) & set(test[0])
    assert len(text_sources.lee_news_sentences()) == 2681  # 300 articles cut into sentences


def test_gensim_missing(monkeypatch):
    monkeypatch.setattr(text_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DatasetNotAvailableError, match="requirements-text.txt"):
        text_sources.gensim_file("lee.cor")


def test_bad_text_inputs(tmp_path, tok, caplog):
    def stream(spec, max_len=12):
        c = _config(text_files=str(spec))
        c.dataset, c.model.max_len, c.batch_size = "text_file", max_len, 2
        return data.pretrain_iterator(
            c, process_index=0, process_count=1, start_step=0, tokenizer=tok
        )

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{empty} has no non-blank line"):
        stream(empty)
    blanks = tmp_path / "blanks"
    blanks.mkdir()
    for name in ("a.txt", "b.txt"):
        (blanks / name).write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=f"every one of the 2 files of {blanks} has no non-blank"):
        stream(blanks)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first\nsecond\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}: line 3 is not UTF-8"):
        stream(latin)
    with pytest.raises(data.DatasetNotAvailableError, match=f"{tmp_path / 'nope'} does not exist"):
        stream(tmp_path / "nope")
    with pytest.raises(data.DatasetNotAvailableError, match="no file matches"):
        stream(tmp_path / "*.md")
    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "a.md").write_text("x\n", encoding="utf-8")
    with pytest.raises(
        data.DatasetNotAvailableError, match=f"no \\*.txt file in the folder {no_txt}"
    ):
        stream(no_txt)
    long = tmp_path / "long.txt"
    long.write_text("the fire\n" + "the fire " * 10 + "\nthe town\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="simclr_jax.data.text"):
        it = stream(long, max_len=6)
        batches = _take(it, 6)  # 6 epochs of one step: the long line in most of them
    rows = np.concatenate([b["tokens"] for b in batches])
    truncated = int((rows[:, -1] == T.SEP_ID).sum())  # only the long line fills a row
    assert it.stats.read == 12 and it.stats.truncated == truncated >= 2
    assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
    c = _config()
    c.dataset = "lee_news"
    with pytest.raises(ValueError, match="needs tokenizer="):
        data.pretrain_iterator(c, process_index=0, process_count=1)


def test_hf_text_from_jsonl(tmp_path, tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.jsonl"
    rows = [{"sentence": s, "label": i % 3} for i, s in enumerate(LINES[:6])]
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows), encoding="utf-8")
    c = _config(hf_path=str(path))
    c.dataset = "hf_text"
    info = data.dataset_info(c)
    assert (info.num_train_examples, info.num_classes) == (6, 3)
    batch = next(
        data.pretrain_iterator(c, process_index=1, process_count=2, start_step=2, tokenizer=tok)
    )
    index = streams.batch_indices(c.seed, 6, 4, 2)[2:]
    np.testing.assert_array_equal(batch["tokens"], T.encode(tok, [LINES[i] for i in index], 12)[0])
    np.testing.assert_array_equal(batch["label"], index % 3)
    c.data.text_field = "body"
    with pytest.raises(ValueError, match="no column data.text_field='body'"):
        data.dataset_info(c)
    saved = tmp_path / "saved"  # a save_to_disk folder of several splits
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": LINES[:5]}),
        test=datasets.Dataset.from_dict({"sentence": LINES[5:]}),
    ).save_to_disk(str(saved))
    c.data.hf_path, c.data.text_field, c.data.text_split = str(saved), "sentence", "test"
    assert data.dataset_info(c).num_train_examples == 6
    assert list(data.training_texts(c)) == LINES[5:]
    c.data.tokenizer_train_examples = 3  # evenly spaced: the first, a middle and the last
    assert list(data.training_texts(c)) == [LINES[5], LINES[7], LINES[10]]
    c.data.text_split = "dev"
    with pytest.raises(ValueError, match="no split data.text_split='dev'; it has"):
        data.dataset_info(c)
