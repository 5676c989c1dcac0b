"""`--mode=import_official`: google-research/simclr TF checkpoints (v1 and v2) into our export.

    python -m simclr_jax.main --config=configs/imagenet.py --workdir=runs/r50_1x_sk1 \\
        --mode=import_official --config.init_from=PATH

PATH is one of what the official code writes or releases:

* a TF2 object-based checkpoint of `tf2/run.py` (`tf.train.Checkpoint(model=...)`, `ckpt-N`), its
  directory, or a TF2 SavedModel directory of the `simclr-checkpoints-tf2` releases (whose
  `variables/` is such a checkpoint); variables are found through the checkpoint's object graph
  (`model/resnet_model/block_groups/...`);
* a name-based TF1 checkpoint of the v1/v2 releases (`model.ckpt-N`, `base_model/conv2d_17/kernel`),
  whose layers are numbered in the order the official graph creates them.

The architecture (depth, width, sk_ratio, stem, head layers and dims) is read from the variables'
names and shapes. The encoder, the projection head and, when present, the supervised linear head
(`params['linear_head']`, on the pooled features) are written to `WORKDIR/export/` in our export
format with `model.compat='simclr_tf'`, so the JAX encoder computes the TF model's features (see
`simclr_jax/models/resnet.py`). Only `tf.train` readers are used; TensorFlow is imported lazily.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from simclr_jax.checkpoint import CheckpointError
from simclr_jax.interop.official_layout import (
    BN_NAMES,
    Entry,
    arch_candidates_tf1,
    encoder_entries,
    head_entries,
    infer_arch_tf2,
    infer_sk_ratio,
    model_config_for,
)

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_LEAVES = ("kernel", "bias") + tuple(BN_NAMES)
# Object-graph children that alias variables or layers tracked under their attribute names.
_ALIASES = frozenset(
    (
        "keras_api",
        "variables",
        "trainable_variables",
        "non_trainable_variables",
        "trainable_weights",
        "non_trainable_weights",
        "weights",
        "regularization_losses",
        "layer_regularization_losses",
        "layer_metrics",
        "metrics",
        "signatures",
        "trainable_variables_list",
        "optimizer",
        "save_counter",
    )
)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _checkpoint_prefix(path: str) -> str:
    """The checkpoint prefix (`.../ckpt-N`) that `path` names; CheckpointError if there is none."""
    import tensorflow as tf

    gfile = tf.io.gfile  # local paths, and gs:// where TensorFlow has GCS support
    if gfile.isdir(path):
        saved_model = os.path.join(path, "variables", "variables")
        if gfile.exists(saved_model + ".index"):
            return saved_model
        try:
            latest = tf.train.latest_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - a garbled 'checkpoint' file raises many kinds
            raise CheckpointError(
                f"{path}: its 'checkpoint' file is not a TensorFlow checkpoint state "
                f"({_first_line(e)}); point --config.init_from at a ckpt-N prefix in it"
            ) from None
        if latest is None:  # no 'checkpoint' file (tf.train.Checkpoint.write): a lone prefix
            index = [f for f in gfile.listdir(path) if f.endswith(".index")]
            prefixes = sorted(f[: -len(".index")] for f in index)
            if len(prefixes) > 1:
                raise CheckpointError(
                    f"{path} holds several checkpoints ({', '.join(prefixes)}) and no "
                    "'checkpoint' file naming the latest; pass one of them as the prefix"
                )
            latest = os.path.join(path, prefixes[0]) if prefixes else None
        if latest is None:
            raise CheckpointError(
                f"{path} holds no TensorFlow checkpoint (no 'checkpoint' file, *.index or "
                "SavedModel variables/); point --config.init_from at a ckpt-N / model.ckpt-N prefix"
            )
        return latest
    for ext in (".index", ".meta"):
        if path.endswith(ext):
            path = path[: -len(ext)]
    if ".data-" in os.path.basename(path):
        path = path[: path.rindex(".data-")]
    if not gfile.exists(path + ".index"):
        raise CheckpointError(
            f"{path} is not a TensorFlow checkpoint ({path}.index does not exist); give the "
            "prefix of an official checkpoint (e.g. .../ckpt-1 or .../model.ckpt-250228)"
        )
    return path


class _Checkpoint:
    """Variables of one TF checkpoint by their official names, and how to read each."""

    def __init__(self, path: str):
        import tensorflow as tf

        self.path = path
        self.prefix = _checkpoint_prefix(path)
        try:
            self.reader = tf.train.load_checkpoint(self.prefix)
            shapes = self.reader.get_variable_to_shape_map()
        except Exception as e:  # noqa: BLE001  (tf raises many OpError kinds on bad files)
            raise CheckpointError(f"cannot read the TF checkpoint {path}: {_first_line(e)}") from e
        self.format = "tf2" if OBJECT_GRAPH in shapes else "tf1"
        try:
            self.keys = self._tf2_keys(shapes) if self.format == "tf2" else self._tf1_keys(shapes)
        except Exception as e:  # noqa: BLE001 - a damaged object graph fails to parse
            raise CheckpointError(
                f"cannot read the variable names of the TF checkpoint {self.prefix}: "
                f"{_first_line(e)}"
            ) from None
        self.shapes = {name: tuple(shapes[key]) for name, key in self.keys.items()}

    def _tf2_keys(self, shapes: dict[str, Any]) -> dict[str, str]:
        """`resnet_model/...` / `_projection_head/...` paths -> checkpoint keys (object graph)."""
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(self.get(OBJECT_GRAPH, raw=True))
        found: dict[str, str] = {}
        visits = [0] * len(graph.nodes)

        def walk(node_id: int, path: tuple[str, ...], seen: frozenset[int]) -> None:
            # Keras SavedModels alias every variable (keras_api, variables/N, ...) and layers
            # share sublayers: skip the aliases and cap the paths per node, so the walk stays
            # linear in the graph's size.
            visits[node_id] += 1
            node = graph.nodes[node_id]
            for attr in node.attributes:
                if attr.name == "VARIABLE_VALUE" and path:
                    found.setdefault("/".join(path), attr.checkpoint_key)
            for child in node.children:
                name = child.local_name
                if name in _ALIASES or name.startswith(("layer-", "layer_with_weights-")):
                    continue
                if child.node_id not in seen and visits[child.node_id] < 4 and len(path) < 16:
                    walk(child.node_id, path + (name,), seen | {child.node_id})

        walk(0, (), frozenset({0}))
        # tf2/run.py checkpoints and SavedModels hold the Keras model as the root's `model`.
        roots = [p for p in found if p.startswith("model/")]
        strip = "model/" if roots else ""
        return {p[len(strip) :]: k for p, k in found.items() if p.startswith(strip)}

    @staticmethod
    def _tf1_keys(shapes: dict[str, Any]) -> dict[str, str]:
        return {k: k for k in shapes if k.split("/")[-1] in VARIABLE_LEAVES + ("global_step",)}

    def get(self, name: str, raw: bool = False) -> Any:
        key = name if raw else self.keys[name]
        try:
            value = self.reader.get_tensor(key)
        except Exception as e:  # noqa: BLE001  (a truncated .data file fails only here)
            raise CheckpointError(
                f"cannot read {key!r} from the TF checkpoint {self.path}: {_first_line(e)}"
            ) from e
        return value if raw else np.asarray(value, np.float32)

    def global_step(self) -> int:
        for name in ("global_step", "global_step" + SUFFIX):
            if name in self.reader.get_variable_to_shape_map():
                return int(self.reader.get_tensor(name))
        return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _resolve(ckpt: _Checkpoint, entries: list[Entry]) -> dict[Entry, str] | None:
    """Checkpoint name of every entry, or None when the layout does not fit the checkpoint."""
    if ckpt.format == "tf2":
        leaf = {"conv": "/kernel", "bn": "/gamma"}
        names = {e: e.tf2 for e in entries}
        return names if all(n + leaf[e.kind] in ckpt.shapes for e, n in names.items()) else None
    # TF1: the official graph numbers conv2d_N and batch_normalization_N in creation order.
    by_kind = {"conv": _numbered(ckpt, "base_model/conv2d", "/kernel")}
    by_kind["bn"] = _numbered(ckpt, "base_model/batch_normalization", "/gamma")
    want = {k: [e for e in entries if e.kind == k] for k in by_kind}
    if any(len(want[k]) != len(by_kind[k]) for k in by_kind):
        return None
    return {e: n for k in by_kind for e, n in zip(want[k], by_kind[k], strict=True)}


def _numbered(ckpt: _Checkpoint, base: str, leaf: str) -> list[str]:
    """`base`, `base_1`, `base_2`, ... present in the checkpoint, in number order (no leaf)."""
    found = {}
    for name in ckpt.shapes:
        if name.startswith(base) and name.endswith(leaf):
            tail = name[len(base) : -len(leaf)]
            if tail == "":
                found[0] = name[: -len(leaf)]
            elif tail[:1] == "_" and tail[1:].isdigit():
                found[int(tail[1:])] = name[: -len(leaf)]
    return [found[i] for i in sorted(found)]


def _encoder(ckpt: _Checkpoint) -> tuple[dict[str, Any], dict[Entry, str]]:
    """The encoder's model config and its entries' checkpoint names."""
    if ckpt.format == "tf2":
        archs = [infer_arch_tf2(ckpt.shapes, ckpt.path)]
    else:
        archs = arch_candidates_tf1(ckpt.shapes, ckpt.path)
    for arch in archs:
        entries = encoder_entries(arch)
        names = _resolve(ckpt, entries)
        if names is None:
            continue
        width = ckpt.shapes[_var(names, entries, "stem_conv")][-1]
        mids = [
            (e.filters * width, ckpt.shapes[names[e] + "/kernel"][-1]) for e in entries if e.sk_fc1
        ]
        sk_ratio = infer_sk_ratio(mids, ckpt.path) if arch["sk"] else 0.0
        return model_config_for(arch, width, sk_ratio), names
    kinds = "resnet_model/ variables" if ckpt.format == "tf2" else "base_model/ conv2d/BN layers"
    raise CheckpointError(
        f"{ckpt.path}: its {kinds} match no official SimCLR ResNet (depths 18/34/50/101/152/200, "
        "plain or SK, ImageNet or CIFAR stem); cannot map this architecture"
    )


def _var(names: dict[Entry, str], entries: list[Entry], ours: str) -> str:
    entry = next(e for e in entries if "/".join(e.ours) == ours)
    return names[entry] + "/kernel"


def _put(tree: dict[str, Any], path: tuple[str, ...], leaf: str, value: np.ndarray) -> None:
    for part in path:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _copy(ckpt, entries, names, params, stats, used) -> None:
    """Copies each entry's variables from the checkpoint into our params / batch_stats trees."""
    for e in entries:
        base = names[e]
        if e.kind in ("conv", "dense"):
            leaves = [("kernel", "kernel", params)] + ([("bias", "bias", params)] if e.bias else [])
        else:
            leaves = [("gamma", "scale", params), ("moving_mean", "mean", stats)]
            leaves += [("moving_variance", "var", stats)]
            leaves += [("beta", "bias", params)] if e.bias else []
        for tf_leaf, ours, tree in leaves:
            name = f"{base}/{tf_leaf}"
            if name not in ckpt.shapes:
                raise CheckpointError(f"{ckpt.path}: {name} is missing; cannot map {e.tf2}")
            _put(tree, e.ours, ours, ckpt.get(name))
            used.add(name)


def read_official(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """An official checkpoint as `(variables, model_config, info)` in our export's layout."""
    path = _absolute(path)
    ckpt = _Checkpoint(path)
    model_config, names = _encoder(ckpt)
    params: dict[str, Any] = {"encoder": {}}
    stats: dict[str, Any] = {"encoder": {}}
    used: set[str] = set()
    entries = list(names)
    _copy(ckpt, entries, names, params["encoder"], stats["encoder"], used)
    heads, head_config = head_entries(ckpt.format, ckpt.shapes, model_config, path)
    model_config.update(head_config)
    for part, entries in heads.items():
        params[part], stats[part] = {}, {}
        _copy(ckpt, entries, {e: e.tf2 for e in entries}, params[part], stats[part], used)
    stats.pop("linear_head", None)
    for part in [p for p in stats if not stats[p]]:
        stats.pop(part)
    scopes = ("resnet_model/", "_projection_head/", "supervised_head/")
    if ckpt.format == "tf1":
        scopes = ("base_model/", "head_contrastive/", "head_supervised/")
    used_keys = {ckpt.keys[n] for n in used}
    left = sorted(n for n in ckpt.shapes if n.startswith(scopes) and ckpt.keys[n] not in used_keys)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise CheckpointError(
            f"{path}: cannot map {', '.join(left[:3])}{more} onto the "
            f"ResNet-{model_config['depth']} (sk_ratio={model_config['sk_ratio']}) it describes"
        )
    _check_shapes(params, stats, model_config, path)
    info = {
        "official_checkpoint": path,
        "format": ckpt.format,
        "checkpoint_prefix": ckpt.prefix,
        "step": ckpt.global_step(),
        "projection_head": "head" in params,
        "supervised_head": (
            {
                "num_classes": int(params["linear_head"]["dense"]["kernel"].shape[1]),
                "input": "features",
            }
            if "linear_head" in params
            else None
        ),
    }
    return {"params": params, "batch_stats": stats}, model_config, info


def _check_shapes(params, stats, model_config, path) -> None:
    """Our model's variable shapes must be exactly the mapped ones (guards the mapping)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from simclr_jax import models

    encoder = models.create_encoder(ml_collections.ConfigDict(model_config))
    want = jax.eval_shape(
        lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    got = {"params": params["encoder"], "batch_stats": stats["encoder"]}
    if jax.tree.map(jnp.shape, got) != jax.tree.map(lambda x: x.shape, dict(want)):
        raise CheckpointError(
            f"{path}: the mapped encoder variables do not fit a ResNet-{model_config['depth']} "
            f"width {model_config['width_multiplier']} sk_ratio {model_config['sk_ratio']}"
        )


def import_official(config: Any, workdir: str) -> str:
    """Writes `workdir/export/` from the official checkpoint `config.init_from`; returns it."""
    from simclr_jax import checkpoint, config_base

    if not config.init_from:
        raise ValueError(
            "--mode=import_official needs --config.init_from=PATH of an official SimCLR TF "
            "checkpoint (ckpt-N, model.ckpt-N, or a SavedModel directory)"
        )
    if config.model.get("name", "resnet") != "resnet":
        raise ValueError(
            f"--mode=import_official reads google-research/simclr's ResNets; "
            f"config.model.name={config.model.name!r} has no official checkpoint (use 'resnet')"
        )
    source = _absolute(config.init_from)
    out = checkpoint.export_dir(workdir)
    meta_path = os.path.join(out, "export.json")
    if os.path.exists(out):
        previous = None
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                previous = json.load(f).get("source", {}).get("official_checkpoint")
        if previous != source:
            raise CheckpointError(
                f"{out} already holds an export (of {previous or 'a pretraining run'}); import "
                "into another --workdir, or remove it first"
            )
    variables, model_config, info = read_official(source)
    full = config_base.base_config().model
    full.update(model_config)
    full.dtype = config.model.dtype
    # The official heads' last BN has its scale, as ours do outside SimSiam.
    model = {**full.to_dict(), "head_out_scale": True}
    path = checkpoint.export_encoder(out, variables, model, info)
    return path
