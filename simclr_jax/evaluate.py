"""Representation quality of a frozen encoder: linear probe and weighted kNN."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import data, parallel

log = logging.getLogger(__name__)


def extract_features(
    apply_fn: Any, variables: Any, images: np.ndarray, mesh: Mesh, batch_size: int
) -> np.ndarray:
    """Pooled features of uint8 `images` `[N, S, S, 3]`, in batches sharded over the mesh.

    The last batch is padded to a full one (padding rows are dropped), so one compile serves all.
    """
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    fn = jax.jit(
        lambda v, x: apply_fn(v, x.astype(jnp.float32) / 255.0),
        in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
        out_shardings=parallel.replicated(mesh),
    )
    variables = jax.device_put(variables, parallel.replicated(mesh))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        # Every host holds the same arrays and transfers only its own devices' rows.
        x = parallel.full_to_global(chunk, mesh)
        out.append(np.asarray(fn(variables, x))[: batch_size - pad])
    return np.concatenate(out).astype(np.float32)


def linear_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, l2: float
) -> float:
    """Test accuracy of L2-regularised multinomial logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0 / (l2 * len(train_x)), max_iter=2000)
    clf.fit(scaler.transform(train_x), train_y)
    return float(np.mean(clf.predict(scaler.transform(test_x)) == test_y))


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Weighted kNN (cosine similarity, weights exp(sim / T)) accuracy, as in InstDisc/SimCLR."""
    k = min(k, len(train_x))
    train = jnp.asarray(train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12))
    labels = jnp.asarray(train_y)

    @jax.jit
    def predict(q):
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        sims, idx = jax.lax.top_k(q @ train.T, k)
        weights = jnp.exp(sims / temperature)
        rows = jnp.arange(q.shape[0])[:, None]
        votes = jnp.zeros((q.shape[0], num_classes)).at[rows, labels[idx]].add(weights)
        return jnp.argmax(votes, axis=1)

    correct = 0
    for start in range(0, len(test_x), chunk):
        pred = np.asarray(predict(jnp.asarray(test_x[start : start + chunk])))
        correct += int(np.sum(pred == test_y[start : start + chunk]))
    return correct / len(test_x)


def encoder_apply(model: Any) -> Any:
    """`(variables, images) -> features` of the model's encoder in inference mode."""

    def apply(variables, x):
        return model.encoder.apply(
            {
                "params": variables["params"]["encoder"],
                "batch_stats": variables["batch_stats"]["encoder"],
            },
            x,
            train=False,
        )

    return apply


def evaluate_encoder(
    config: ml_collections.ConfigDict,
    apply_fn: Any,
    variables: Any,
    mesh: Mesh,
    splits: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> dict[str, float]:
    """`{'linear': acc, 'knn': acc}` of the frozen encoder on (train, test) labelled arrays."""
    (train_images, train_y), (test_images, test_y) = splits
    bs = config.eval.batch_size
    train_f = extract_features(apply_fn, variables, train_images, mesh, bs)
    test_f = extract_features(apply_fn, variables, test_images, mesh, bs)
    return {
        "linear": linear_probe_accuracy(train_f, train_y, test_f, test_y, config.eval.linear_l2),
        "knn": knn_accuracy(
            train_f,
            train_y,
            test_f,
            test_y,
            num_classes,
            config.eval.knn_k,
            config.eval.knn_temperature,
        ),
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The random-init vs pretrained table printed at the end of a run."""
    rows = ["", f"{'encoder':<14}{'linear probe':>14}{'kNN':>10}", "-" * 38]
    for name in ("random_init", "pretrained"):
        if name in results.get("linear", {}):
            lin, knn = results["linear"][name], results["knn"][name]
            rows.append(f"{name:<14}{lin:>14.4f}{knn:>10.4f}")
    return "\n".join(rows)


def evaluate_run(
    config: ml_collections.ConfigDict, model: Any, state: Any, mesh: Mesh, workdir: str
) -> dict[str, dict[str, float]]:
    """Linear probe + kNN for the random-init and the pretrained encoder; writes eval.json."""
    from simclr_jax.train import init_variables

    info = data.dataset_info(config)
    splits = (data.eval_arrays(config, "train"), data.eval_arrays(config, "test"))
    apply_fn = encoder_apply(model)
    random_vars = init_variables(
        model, jax.random.fold_in(jax.random.key(config.seed), 0), config.augment.image_size
    )
    trained_vars = {"params": state.params, "batch_stats": state.batch_stats}
    results: dict[str, dict[str, float]] = {"linear": {}, "knn": {}}
    for name, variables in (("random_init", random_vars), ("pretrained", trained_vars)):
        r = evaluate_encoder(config, apply_fn, variables, mesh, splits, info.num_classes)
        results["linear"][name] = r["linear"]
        results["knn"][name] = r["knn"]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(format_table(results), flush=True)
    return results
