"""Cached teacher predictions (`distill.cache_teacher`): the teacher's logits once per image.

With `distill.augment=False` the student sees every train image's centre view in every epoch,
and the teacher, in inference mode, would give it the same logits each time: they are computed
once, in the train split's order, stored in the workdir, looked up by example index on the host
and handed to the step as `batch['teacher_logits']`, which then skips the teacher's forward.
With crops a cache would give the student targets computed on another view than the one it sees
(teacher and student must see the same view: Beyer et al., CVPR 2022, "Knowledge distillation:
a good teacher is patient and consistent"), so the config refuses `cache_teacher` with crops.

`WORKDIR/teacher_cache/`: `logits_<first>.npy`, float32 [B, C] for examples [first, first + B)
of the train split (B the pass's global batch; the last one shorter), each written whole under
a temporary name and renamed, then `cache.json` (the teacher, split and classes it belongs to)
once every example is covered. A killed pass resumes with the examples no chunk covers (the
other batches are read, not forwarded); a finished cache is read and never recomputed; one
written for another teacher, dataset or input size is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import augment
from simclr_jax.data import labelled
from simclr_jax.evals import classifier
from simclr_jax.evals.distill_teacher import Teacher
from simclr_jax.runtime import compiled, loop, parallel

log = logging.getLogger(__name__)

CACHE_DIR = "teacher_cache"
MANIFEST = "cache.json"


def cache_dir(workdir: str) -> str:
    """Where a distillation run keeps its teacher's cached predictions."""
    return os.path.join(workdir, CACHE_DIR)


def _chunk_name(first: int) -> str:
    return f"logits_{first:010d}.npy"


def describe(config: ml_collections.ConfigDict, teacher: Teacher, num_examples: int) -> dict:
    """What a cache belongs to: the teacher (its path and classifier's bytes), split, input."""
    kernel = np.ascontiguousarray(teacher.variables["params"]["classifier"]["kernel"])
    return {
        "teacher": teacher.path,
        "teacher_digest": hashlib.blake2b(kernel.tobytes(), digest_size=16).hexdigest(),
        "teacher_head_layer": teacher.head_layer,
        "dataset": config.dataset,
        "image_size": int(config.data.image_size),
        "num_examples": int(num_examples),
        "num_classes": int(teacher.num_classes),
    }


def _read_chunks(root: str, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, c], covered [n]) from the chunk files in `root` (temporary ones ignored)."""
    logits, covered = np.zeros((n, c), np.float32), np.zeros((n,), bool)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for name in names:
        if not (name.startswith("logits_") and name.endswith(".npy")):
            continue
        first = int(name[len("logits_") : -len(".npy")])
        chunk = np.load(os.path.join(root, name))
        if chunk.ndim != 2 or chunk.shape[1] != c or first + len(chunk) > n:
            raise ValueError(
                f"{os.path.join(root, name)}: shape {chunk.shape} does not fit {n} examples of "
                f"{c} classes; move {root} away to recompute the teacher's predictions"
            )
        logits[first : first + len(chunk)] = chunk
        covered[first : first + len(chunk)] = True
    return logits, covered


def _write_chunk(root: str, first: int, chunk: np.ndarray) -> None:
    """One chunk, whole or not at all: a temporary file renamed into place."""
    path = os.path.join(root, _chunk_name(first))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, chunk)
    os.replace(tmp, path)


def _write_manifest(path: str, content: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1)
    os.replace(path + ".tmp", path)


def _forward(teacher: Teacher, aug_cfg: Any, mesh: Any, shardings: Any) -> Any:
    """(variables, uint8 batch) -> float32 logits, replicated; the step's input preparation."""
    rep = parallel.replicated(mesh)
    shardings = rep if shardings is None else shardings
    model = teacher.model

    def logits(variables: Any, images: jax.Array) -> jax.Array:
        # Without crop and flip the key draws nothing: the step's centre view, bit for bit.
        x = augment.views(jax.random.key(0), images, aug_cfg, num_views=1)[0]
        return model.apply(variables, x, train=False).astype(jnp.float32)

    return compiled.cached(
        lambda: jax.jit(
            logits, in_shardings=(shardings, parallel.data_sharded(mesh)), out_shardings=rep
        )
    )


def teacher_cache(
    config: ml_collections.ConfigDict,
    workdir: str,
    teacher: Teacher,
    variables: Any,
    shardings: Any,
    mesh: Any,
) -> np.ndarray:
    """The train split's teacher logits [N, C] float32: the workdir's cache, completed if needed."""
    root = cache_dir(workdir)
    n = labelled.labelled_size(config, "train")
    want = describe(config, teacher, n)
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            have = json.load(f)
        diff = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise ValueError(
                f"{root} holds the predictions of another teacher or split ({', '.join(diff)}); "
                "move it away to recompute them"
            )
    logits, covered = _read_chunks(root, n, teacher.num_classes)
    parallel.barrier("distill_cache_read")  # every host sees the chunks before any is written
    if covered.all():
        return logits
    if jax.process_index() == 0:  # the chunks to come belong to this teacher
        _write_manifest(manifest, {**want, "complete": False})
    batch = classifier.global_batch(config.eval.batch_size, mesh, n)
    hosts, b = jax.process_count(), batch // jax.process_count()
    fn = _forward(teacher, classifier.train_augment_config(config, False), mesh, shardings)
    batches, steps = labelled.eval_batches(config, "train", batch)
    computed = 0
    for i in range(steps):
        host_batch = next(batches)
        first, last = i * batch, min((i + 1) * batch, n)
        if covered[first:last].all():
            continue
        images = parallel.host_to_global({"image": host_batch["image"]}, mesh)["image"]
        out = np.asarray(jax.device_get(fn(variables, images)))
        # Host p's row j of batch i is example i*B + p + hosts*j: rows [p*b, (p+1)*b) of `out`.
        chunk = out.reshape(hosts, b, -1).transpose(1, 0, 2).reshape(batch, -1)[: last - first]
        logits[first:last] = chunk
        if jax.process_index() == 0:
            _write_chunk(root, first, chunk)
        computed += last - first
    loop.finish_eval_stream("teacher cache", batches)
    if jax.process_index() == 0:
        _write_manifest(manifest, {**want, "complete": True})
    parallel.barrier("distill_cache_written")
    log.info("teacher cache: %d of %d images forwarded into %s", computed, n, root)
    return logits
