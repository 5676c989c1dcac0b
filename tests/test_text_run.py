"""A whole CLEAR run on the bundled text corpus, as `python -m simclr_jax.main` runs it.

Tiny (a 'mu' encoder, 4 then 6 steps): the tokenizer is trained once into the workdir and reused
on resume, the export carries it, and the end-of-run evaluation writes STS and the probe for
the random-init and the pretrained encoder.
"""

import json
import os

import pytest

pytest.importorskip("tokenizers")

from tiny import load_config  # noqa: E402

from simclr_jax import modes  # noqa: E402


def _run(workdir: str, steps: int) -> None:
    c = load_config("clear_text")
    c.model.variant, c.model.vocab_size, c.model.max_len = "mu", 512, 24
    c.model.head_hidden_dim, c.model.head_out_dim = 16, 8
    c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 16, steps, 2, 2
    c.eval.batch_size, c.eval.at_end = 64, steps > 4  # evaluated once, after the resume
    modes.run("pretrain", c, workdir, steps > 4)  # the longer run extends the first


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
    assert results["tasks"] == {"sts": "lee", "linear": "polarity"}
    for kind in ("sts", "linear"):
        assert set(results[kind]) == {"random_init", "pretrained"}
    assert -1 <= results["sts"]["pretrained"] <= 1 and 0 <= results["linear"]["pretrained"] <= 1
