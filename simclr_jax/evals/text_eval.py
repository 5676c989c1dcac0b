"""Evaluation of a text encoder: unsupervised STS and a linear probe, random init vs pretrained.

STS (SentEval's unsupervised protocol): the Spearman correlation between the cosine similarity of
the two texts' pooled features and the human score, on `eval.sts_task` ('stsb': GLUE's STS-B
validation pairs; 'lee': the Lee, Pincombe & Welsh 2005 document pairs that ship with gensim, the
offline default); `sts_centred` is the same on features minus their mean over the STS texts
(the common direction that training makes dominate every cosine, see `centred`). The probe
(SentEval's): an L2-regularised logistic regression on the frozen,
standardised features of `eval.probe_task`: 'sst2' (GLUE's SST-2) trained on train, scored on
validation; 'polarity' (Pang & Lee's 200 movie-review sentences in gensim, SentEval's MR task in
small) scored by stratified 10-fold cross-validation, as SentEval scores MR.
Features are computed on the run's mesh; the texts are few enough (a split of SST-2 at most) to
hold on every host.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import models
from simclr_jax.runtime import compiled, files, parallel

log = logging.getLogger(__name__)

CV_FOLDS = 10  # SentEval's cross-validation of the probe on a task without a test split
# Probe tasks scored by cross-validation on all their sentences (the rest: train -> test split).
CROSS_VALIDATED = ("polarity",)


def _extract_fn(model_config: Any, mesh: Mesh) -> Any:
    """`(encoder variables, tokens [B, L]) -> features [B, D]`, jitted once per architecture."""
    encoder = models.create_encoder(model_config)
    return compiled.cached(
        lambda: jax.jit(
            lambda v, t: encoder.apply(v, t, train=False).astype(jnp.float32),
            in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
            out_shardings=parallel.replicated(mesh),
        )
    )


def text_features(
    model_config: Any, encoder_vars: Any, tokens: np.ndarray, mesh: Mesh, batch_size: int
) -> np.ndarray:
    """Pooled features float32 [N, D] of token rows [N, L] (every host passes the same rows)."""
    n = mesh.devices.size
    batch = max(n, batch_size // n * n)
    extract = _extract_fn(model_config, mesh)
    sharding = parallel.data_sharded(mesh)
    variables = jax.device_put(encoder_vars, parallel.replicated(mesh))
    out = []
    for start in range(0, len(tokens), batch):
        chunk = tokens[start : start + batch]
        padded = np.zeros((batch, tokens.shape[1]), np.int32)
        padded[: len(chunk)] = chunk
        # Every host holds the whole chunk: each device takes its rows of it.
        x = jax.make_array_from_callback(padded.shape, sharding, lambda idx, p=padded: p[idx])
        out.append(np.asarray(jax.device_get(extract(variables, x)))[: len(chunk)])
    if not out:
        return np.zeros((0, models.encoder_feature_dim(model_config)), np.float32)
    return np.concatenate(out)


def centred(features: np.ndarray) -> np.ndarray:
    """`features` minus their mean: the common direction that dominates every cosine removed.

    Contrastive and MLM training make pooled features anisotropic (all pairwise cosines high,
    Ethayarajh 2019); subtracting the mean over the evaluated texts is the first step of
    All-but-the-Top (Mu & Viswanath 2018) and of BERT-whitening (Su et al. 2021).
    """
    return features - features.mean(axis=0, keepdims=True)


def sts_spearman(f1: np.ndarray, f2: np.ndarray, gold: np.ndarray) -> float:
    """Spearman's rho between the pairs' cosine similarities and the gold scores."""
    from scipy.stats import spearmanr

    def unit(f: np.ndarray) -> np.ndarray:
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    cosine = np.sum(unit(f1) * unit(f2), axis=1)
    return float(spearmanr(cosine, gold).statistic)


def probe_accuracy(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None, seed: int
) -> float:
    """Accuracy of a logistic regression on standardised frozen features (SentEval's).

    `test` None: the mean accuracy of a stratified 10-fold cross-validation on `train`, as
    SentEval scores its small sets (MR, Pang & Lee's movie-review sentences, among them).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    if test is None:
        folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
        return float(np.mean(cross_val_score(clf, *train, cv=folds)))
    clf.fit(*train)
    return float(clf.score(*test))


def evaluate_text_encoder(
    config: ml_collections.ConfigDict,
    model_config: Any,
    encoder_vars: Any,
    mesh: Mesh,
    inputs: dict[str, Any],
) -> dict[str, float]:
    """`{'sts', 'sts_centred', 'linear'}` of one encoder on the inputs of `text_inputs`."""
    batch = config.eval.batch_size
    feats = text_features(model_config, encoder_vars, inputs["tokens"], mesh, batch)
    sts = sts_spearman(feats[inputs["sts1"]], feats[inputs["sts2"]], inputs["sts_gold"])
    rows = np.unique(np.concatenate([inputs["sts1"], inputs["sts2"]]))
    c = np.zeros_like(feats)
    c[rows] = centred(feats[rows])  # the mean over the STS texts only
    sts_c = sts_spearman(c[inputs["sts1"]], c[inputs["sts2"]], inputs["sts_gold"])
    test = None if not len(inputs["test"]) else (feats[inputs["test"]], inputs["test_labels"])
    linear = probe_accuracy((feats[inputs["train"]], inputs["train_labels"]), test, config.seed)
    return {"sts": sts, "sts_centred": sts_c, "linear": linear}


def text_inputs(config: ml_collections.ConfigDict, tok: Any) -> dict[str, Any]:
    """The STS pairs and the probe's splits as rows of one token array of distinct texts.

    `{'tokens' [T, L], 'sts1', 'sts2', 'train', 'test' (row indices), 'sts_gold',
    'train_labels', 'test_labels'}`: a text in several pairs (the Lee documents are in 49 each)
    is encoded once. Truncated at `model.max_len` and counted.
    """
    from simclr_jax.data import text_eval_data, tokenizer

    max_len = int(config.model.max_len)
    s1, s2, gold = text_eval_data.sts_pairs(config, config.eval.sts_task)
    task = config.eval.probe_task
    if task in CROSS_VALIDATED:
        train_x, train_y = text_eval_data.probe_texts(config, task, "all")
        test_x, test_y = [], np.zeros((0,), np.int32)
    else:
        train_x, train_y = text_eval_data.probe_texts(config, task, "train")
        held_out = text_eval_data.PROBE_SPLITS[task][1]  # sst2: its labelled 'validation'
        test_x, test_y = text_eval_data.probe_texts(config, task, held_out)
    texts = list(dict.fromkeys([*s1, *s2, *train_x, *test_x]))
    row = {t: i for i, t in enumerate(texts)}
    tokens, _, truncated = tokenizer.encode(tok, texts, max_len)
    if truncated:
        log.info(
            "evaluation: %d of %d texts longer than model.max_len=%d truncated",
            truncated,
            len(texts),
            max_len,
        )
    out: dict[str, Any] = {"tokens": tokens, "sts_gold": gold}
    out.update(train_labels=np.asarray(train_y), test_labels=np.asarray(test_y))
    for name, part in (("sts1", s1), ("sts2", s2), ("train", train_x), ("test", test_x)):
        out[name] = np.array([row[t] for t in part], np.int64)
    return out


def format_text_table(results: dict[str, dict[str, float]], tasks: tuple[str, str]) -> str:
    """The random-init vs pretrained table printed at the end of a text run."""
    heads = (f"STS {tasks[0]}", "centred", f"probe {tasks[1]}")
    keys = ("sts", "sts_centred", "linear")
    rows = ["", f"{'encoder':<14}" + "".join(f"{h:>16}" for h in heads), "-" * 62]
    for name in ("random_init", "pretrained"):
        if name in results.get("sts", {}):
            rows.append(f"{name:<14}" + "".join(f"{results[k][name]:>16.4f}" for k in keys))
    return "\n".join(rows)


def evaluate_text_run(
    config: ml_collections.ConfigDict,
    variables_by_name: dict[str, Any],
    mesh: Mesh,
    workdir: str,
    tok: Any,
) -> dict[str, Any]:
    """STS + linear probe of each `{name: encoder variables}`; writes `eval.json`.

    `eval.json` is `{'sts': {'random_init', 'pretrained'}, 'sts_centred': {...}, 'linear':
    {...}, 'tasks': {...}}` (Spearman's rho of plain and of mean-centred cosines; accuracy).
    """
    inputs = text_inputs(config, tok)
    results: dict[str, Any] = {}
    for name, enc_vars in variables_by_name.items():
        model_config = ml_collections.ConfigDict(
            models.describe_encoder(config.model, enc_vars["params"])
        )
        got = evaluate_text_encoder(config, model_config, enc_vars, mesh, inputs)
        for kind, value in got.items():
            results.setdefault(kind, {})[name] = value
    tasks = (config.eval.sts_task, config.eval.probe_task)
    results["tasks"] = {"sts": tasks[0], "sts_centred": tasks[0], "linear": tasks[1]}
    if jax.process_index() == 0:
        files.write_json_atomic(os.path.join(workdir, "eval.json"), results, indent=2)
        print(format_text_table(results, tasks), flush=True)
    return results
