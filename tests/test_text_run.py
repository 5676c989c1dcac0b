"""A whole CLEAR run on bundled text, as `python -m simclr_jax.main` runs it.

Tiny (a 'mu' encoder on the 160 labelled polarity sentences, 4 then 6 steps): the tokenizer is
trained once into the workdir and reused on resume, the export carries it, the end-of-run
evaluation writes STS and the probe for the random-init and the pretrained encoder, and a
linear evaluation of the run's own checkpoint reads WORKDIR/tokenizer.json.
"""

import json
import os

import pytest

pytest.importorskip("tokenizers")

from tiny import load_config  # noqa: E402

from simclr_jax import modes  # noqa: E402


def _config(steps: int):
    c = load_config("clear_text")
    c.dataset = "polarity"  # labelled: linear_eval of the run's own checkpoint reads the same
    c.model.variant, c.model.vocab_size, c.model.max_len = "mu", 512, 24
    c.model.head_hidden_dim, c.model.head_out_dim = 16, 8
    c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 16, steps, 2, 2
    c.eval.batch_size, c.eval.at_end = 64, steps > 4  # evaluated once, after the resume
    return c


def _run(workdir: str, steps: int) -> None:
    modes.run("pretrain", _config(steps), workdir, steps > 4)  # the longer run extends the first


def test_a_text_run_trains_its_tokenizer_once_exports_it_and_evaluates(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    _run(workdir, 4)
    tokenizer = os.path.join(workdir, "tokenizer.json")
    first = open(tokenizer).read()
    assert open(os.path.join(workdir, "export", "tokenizer.json")).read() == first
    mtime = os.path.getmtime(tokenizer)
    caplog.set_level("INFO")
    _run(workdir, 6)
    assert "resumed from step 4" in caplog.text
    assert os.path.getmtime(tokenizer) == mtime and open(tokenizer).read() == first
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [2, 4, 6]
    with open(os.path.join(workdir, "eval.json")) as f:
        results = json.load(f)
    assert results["tasks"] == {"sts": "lee", "sts_centred": "lee", "linear": "polarity"}
    for kind in ("sts", "sts_centred", "linear"):
        assert set(results[kind]) == {"random_init", "pretrained"}
    assert -1 <= results["sts"]["pretrained"] <= 1 and 0 <= results["linear"]["pretrained"] <= 1
    c = _config(6)
    c.linear_eval.precompute_features = True
    result = modes.run("linear_eval", c, workdir, False)
    assert 0 <= result["top1"] <= 1 and result["num_labels"] == 160
    with open(os.path.join(workdir, "linear_eval.json")) as f:
        assert json.load(f)["config"]["data"]["tokenizer"] == tokenizer
