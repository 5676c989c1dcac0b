"""The sharded kNN equals a brute-force numpy kNN; eval streams visit every example once."""

import jax
import numpy as np
import pytest
from tiny import tiny_config

from simclr_jax import data
from simclr_jax.data import labelled
from simclr_jax.evals import knn
from simclr_jax.runtime import parallel


def _numpy_knn_votes(bank, labels, queries, k, temperature, num_classes):
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ b.T
    votes = np.zeros((len(q), num_classes))
    for i, row in enumerate(sims):
        top = np.argsort(-row)[:k]
        np.add.at(votes[i], labels[top], np.exp(row[top] / temperature))
    return votes


@pytest.mark.parametrize("k", [5, 40])
def test_sharded_knn_equals_brute_force_numpy_on_8_devices(k):
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    rng = np.random.default_rng(0)
    nb, b, d, c = 3, 16, 12, 7
    bank = rng.normal(size=(nb, b, d)).astype(np.float32)
    labels = rng.integers(0, c, (nb, b)).astype(np.int32)
    labels[-1, 5:] = -1  # padding rows of the last batch: never neighbours
    queries = rng.normal(size=(24, d)).astype(np.float32)
    sharding = knn.bank_sharding(mesh)
    g_bank, g_labels = jax.device_put(bank, sharding), jax.device_put(labels, sharding)
    # Each device holds only its rows of every batch: 2 of the 16.
    assert {s.data.shape for s in g_bank.addressable_shards} == {(nb, 2, d)}
    votes = knn.knn_votes(g_bank, g_labels, queries, mesh, k=k, temperature=0.1, num_classes=c)
    valid = labels.reshape(-1) >= 0
    want = _numpy_knn_votes(
        bank.reshape(-1, d)[valid], labels.reshape(-1)[valid], queries, k, 0.1, c
    )
    np.testing.assert_allclose(np.asarray(votes), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(np.asarray(votes), 1), np.argmax(want, 1))


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_batches_visit_every_example_exactly_once(process_count):
    config = tiny_config()
    want_x, want_y = data.eval_arrays(config, "test")  # 360 digits
    seen_x, seen_y, counts = [], [], []
    for p in range(process_count):
        batches, n = labelled.eval_batches(
            config, "test", 96, process_index=p, process_count=process_count
        )
        got = list(batches)
        counts.append(n)
        assert len(got) == n and all(len(g["label"]) == 96 // process_count for g in got)
        for g in got:
            seen_x.append(g["image"][g["mask"]])
            seen_y.append(g["label"][g["mask"]])
    assert len(set(counts)) == 1  # every host steps through the same number of batches
    seen_x, seen_y = np.concatenate(seen_x), np.concatenate(seen_y)
    assert len(seen_y) == 360
    order = np.lexsort(seen_x.reshape(360, -1).T)
    want = np.lexsort(want_x.reshape(360, -1).T)
    np.testing.assert_array_equal(seen_x[order], want_x[want])
    np.testing.assert_array_equal(seen_y[order], want_y[want])
