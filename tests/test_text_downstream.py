"""Linear evaluation, fine-tuning and kNN of a text encoder on labelled text (issue 33 item 4).

A tiny text export (model.name='text', variant 'mu', 96 tokens, max_len 16, a WordPiece
tokenizer beside it) is evaluated on the bundled 'polarity' sentences (160 train / 40 test).
The labelled text streams are checked against the one order (`streams.batch_indices`) and
`tokenizer.encode` of the texts they should hold.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from simclr_jax import checkpoint, config_base, data, models, modes
from simclr_jax.data import labelled, streams, text_sources
from simclr_jax.data import tokenizer as T
from simclr_jax.evals import finetune
from tests import tiny

MAX_LEN, VOCAB = 16, 96


def _config(export: str = "", **data_keys):
    """A downstream run on 'polarity' with tiny budgets (batch 32: 5 steps an epoch)."""
    c = config_base.base_config()
    c.dataset, c.init_from, c.seed = "polarity", export, 3
    # As a text pretraining config says (validate_config refuses image ones on text data).
    c.method = "clear"
    c.model.update(dict(name="text", variant="mu", vocab_size=VOCAB, max_len=MAX_LEN))
    c.data.prefetch = 0
    c.log_every_steps, c.checkpoint_every_steps = 2, 2
    c.eval.batch_size = 40
    c.linear_eval.update(dict(epochs=2.0, batch_size=32))
    c.finetune.update(dict(epochs=1.0, batch_size=32, optimizer="sgd", base_lr=0.05))
    for k, v in data_keys.items():
        c.data[k] = v
    return c


def _stream_config(export: str, **data_keys):
    """`_config` as the jobs hand it to the labelled streams (`classifier.text_config`)."""
    return _config(export, tokenizer=os.path.join(export, T.TOKENIZER_FILE), **data_keys)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A random-init 'mu' text encoder exported with its tokenizer, as `export_run` writes it."""
    root = tmp_path_factory.mktemp("text_export")
    tok = T.train_tokenizer(text_sources.polarity("all")[0], VOCAB)
    tok_path = str(root / T.TOKENIZER_FILE)
    T.save(tok, tok_path)
    c = config_base.base_config()
    c.model.update(dict(name="text", variant="mu", vocab_size=VOCAB, max_len=MAX_LEN))
    encoder = models.create_encoder(c.model)
    params = tiny.init(encoder, jax.random.key(0), models.dummy_input(c.model, 0), train=False)
    variables = jax.device_get(
        {
            "params": {"encoder": params["params"], "head": {}},
            "batch_stats": {"encoder": {}, "head": {}},
        }
    )
    model = models.describe_encoder(c.model, variables["params"]["encoder"])
    model["head_out_scale"] = models.head_out_scale(c.model, {})
    source = {"workdir": str(root), "step": 0, "config": c.to_dict()}
    path = str(root / "export")
    checkpoint.export_encoder(
        path, variables, model, source, extra_files={T.TOKENIZER_FILE: tok_path}
    )
    return path


def _encode(export: str, texts: list[str]) -> np.ndarray:
    return T.encode(T.load(os.path.join(export, T.TOKENIZER_FILE)), texts, MAX_LEN)[0]


def test_polarity_train_stream_order_hosts_resume_and_keep(export):
    c = _stream_config(export)
    texts, labels = text_sources.polarity("train")
    np.testing.assert_array_equal(labelled.train_labels(c), labels)
    assert labelled.labelled_size(c, "train") == 160 and labelled.labelled_size(c, "test") == 40
    assert data.dataset_info(c).num_classes == 2
    start = labelled.labelled_train_iterator(c, 16, seed=3, process_index=0, process_count=1)
    first = [next(start) for _ in range(12)]
    for t in (0, 11):  # 11: the second epoch (10 batches of 16 an epoch)
        index = streams.batch_indices(3, 160, 16, t)
        resumed = next(
            labelled.labelled_train_iterator(c, 16, seed=3, process_count=1, start_step=t)
        )
        assert set(resumed) == {"tokens", "label"} and resumed["tokens"].dtype == np.int32
        np.testing.assert_array_equal(resumed["tokens"], _encode(export, [texts[i] for i in index]))
        np.testing.assert_array_equal(resumed["label"], labels[index])
        np.testing.assert_array_equal(first[t]["tokens"], resumed["tokens"])
        hosts = [
            next(
                labelled.labelled_train_iterator(
                    c, 16, seed=3, process_index=p, process_count=2, start_step=t
                )
            )
            for p in (0, 1)
        ]
        for key in ("tokens", "label"):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in hosts]), resumed[key])
    keep = finetune.label_subset(labels, 0.25, 0)  # 20 of each class
    assert labelled.labelled_size(c, "train", keep=keep) == len(keep) == 40
    c.data.prefetch = 2
    batch = next(labelled.labelled_train_iterator(c, 8, keep=keep, seed=3, start_step=6))
    np.testing.assert_array_equal(batch["label"], labels[keep[streams.batch_indices(3, 40, 8, 6)]])
    with pytest.raises(ValueError, match="subset='1pct' names images.*'polarity' is text"):
        labelled.labelled_size(c, "train", subset="1pct")
    tok = T.load(c.data.tokenizer)  # pretraining reads the same labelled train split
    c.batch_size = 16
    batch = next(data.pretrain_iterator(c, process_count=1, start_step=11, tokenizer=tok))
    np.testing.assert_array_equal(batch["label"], labels[streams.batch_indices(3, 160, 16, 11)])


def test_polarity_eval_batches_visit_each_example_once_per_host(export):
    c = _stream_config(export)
    texts, labels = text_sources.polarity("test")
    for p in (0, 1):
        batches, n = labelled.eval_batches(c, "test", 16, process_index=p, process_count=2)
        got = list(batches)
        assert n == len(got) == 3  # 20 examples a host, 8 a batch
        mask = np.concatenate([b["mask"] for b in got])
        assert mask.sum() == 20 and mask[:20].all()
        tokens = np.concatenate([b["tokens"] for b in got])
        np.testing.assert_array_equal(tokens[:20], _encode(export, texts[p::2]))
        np.testing.assert_array_equal(tokens[20:, :2], [[T.CLS_ID, T.SEP_ID]] * 4)
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in got])[:20], labels[p::2])
    batches, n = labelled.eval_batches(c, "test", 16, max_examples=10, process_count=1)
    assert n == 1 and next(batches)["mask"].sum() == 10  # data.eval_max_examples' cap


def test_sst2_eval_batches_and_unlabelled_text_refused(export):
    tfds = data.import_tfds()
    c = _stream_config(export, tfds_name="glue/sst2")
    c.dataset = "tfds_text"
    with tfds.testing.mock_data(num_examples=10):
        records = tfds.data_source("glue/sst2", split="validation")
        texts = [text_sources.as_str(records[i]["sentence"]) for i in range(10)]
        batches, n = labelled.eval_batches(c, "test", 8)
        got = list(batches)
        assert n == 2 and np.concatenate([b["mask"] for b in got]).sum() == 10
        np.testing.assert_array_equal(
            np.concatenate([b["tokens"] for b in got])[:10], _encode(export, texts)
        )
        np.testing.assert_array_equal(
            np.concatenate([b["label"] for b in got])[:10],
            [int(records[i]["label"]) for i in range(10)],
        )
        c.data.tfds_name, c.data.text_field = "glue/stsb", "sentence1"  # float scores: no classes
        with pytest.raises(ValueError, match="tfds_name='glue/stsb'.* no class labels in split"):
            labelled.labelled_size(c, "test")
    c.dataset = "lee_news"
    with pytest.raises(ValueError, match=r"^config.dataset='lee_news' has no class labels[^\n]*$"):
        labelled.eval_batches(c, "test", 8)
    c.dataset, c.data.text_test_split = "polarity", "dev"
    with pytest.raises(ValueError, match="polarity has no split 'dev'; allowed: train, valid"):
        labelled.labelled_size(c, "test")


def _check_result(path: str, job: str, export: str) -> dict:
    saved = json.load(open(path))
    assert 0 <= saved["top1"] <= saved["top5"] <= 1 and np.isfinite(saved["top1"]), saved
    assert saved["source"] == os.path.abspath(export) and saved["job"] == job
    assert saved["config"]["data"]["tokenizer"] == os.path.join(export, T.TOKENIZER_FILE)
    assert saved["config"]["model"]["name"] == "text"
    return saved


def test_linear_eval_streamed_and_on_precomputed_features(export, tmp_path):
    c = _config(export)
    result = modes.run("linear_eval", c, str(tmp_path / "streamed"), False)
    saved = _check_result(str(tmp_path / "streamed" / "linear_eval.json"), "linear_eval", export)
    assert saved["num_labels"] == 160 and saved["num_test_examples"] == 40
    assert 0 <= result["knn_top1"] <= 1
    c.linear_eval.precompute_features = True
    modes.run("linear_eval", c, str(tmp_path / "fast"), False)
    fast = _check_result(str(tmp_path / "fast" / "linear_eval.json"), "linear_eval", export)
    assert fast["num_labels"] == 160 and fast["precompute_features"] and 0 <= fast["knn_top1"] <= 1
    c.data.tokenizer = str(tmp_path / "none.json")
    with pytest.raises(ValueError, match=r"^tokenizer file .*none.json does not exist"):
        modes.run("linear_eval", c, str(tmp_path / "missing"), False)


def test_finetune_writes_its_result_and_resumes_to_the_same_one(export, tmp_path, monkeypatch):
    c = _config(export)
    full = finetune.finetune(c, str(tmp_path / "full"))
    _check_result(str(tmp_path / "full" / "finetune.json"), "finetune", export)
    assert full["steps"] == 5 and full["num_labels"] == 160
    real = labelled.labelled_train_iterator

    def dying(*args, **kwargs):  # the stream dies after 3 batches: the checkpoint of step 2 lives
        it = real(*args, **kwargs)
        for _ in range(3):
            yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(labelled, "labelled_train_iterator", dying)
    workdir = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune(c, workdir)
    monkeypatch.undo()
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["2"]
    resumed = finetune.finetune(c, workdir)
    assert (resumed["top1"], resumed["top5"]) == (full["top1"], full["top5"])
    for a, b in zip(
        jax.tree.leaves(resumed["variables"]), jax.tree.leaves(full["variables"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
