"""The teacher of `--mode=distill`: a fine-tuned network with its classifier, frozen.

`config.distill.teacher` is one of
- a fine-tune run's workdir (`--mode=finetune`): the network of its latest checkpoint, whose
  architecture and `from_head_layer` its `finetune.json` records (the run must have finished);
- an export whose `params['linear_head']` holds a classifier: `--mode=import_official` of one
  of Google's fine-tuned SimCLR v2 checkpoints (or a workdir holding such an `export/`), or a
  distilled student's export (`--mode=distill` writes one, so students can teach in turn).

Either becomes a `Classifier` (encoder, the first `head_layer` projection-head layers, linear
layer) with its variables checked against the architecture; what cannot teach this run (no
classifier, other classes, an input smaller than the network's downsampling) is refused in one
line naming the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from simclr_jax import checkpoint, config_base, models
from simclr_jax.evals import classifier
from simclr_jax.runtime import parallel

FINETUNE_RESULT = "finetune.json"
# distill.shard_teacher='auto' shards a teacher larger than this: replicated, every device holds
# all of it (ResNet-50: 0.1 GB of fp32; ResNet-152 3x SK, the paper's biggest: 3.2 GB).
SHARD_TEACHER_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen classifier: its network, variables (Classifier layout) and where it came from."""

    model: classifier.Classifier
    model_config: ml_collections.ConfigDict  # the encoder's (and head's) architecture
    variables: dict[str, Any]  # {'params'|'batch_stats': {'encoder', 'head'?, 'classifier'?}}
    head_layer: int  # projection-head layers before the classifier (0: pooled features)
    num_classes: int
    path: str
    kind: str  # 'export' | 'finetune'


def total_stride(model_config: ml_collections.ConfigDict) -> int:
    """The encoder's downsampling: a ViT's patch, a ResNet's stem (/4 or /1) x 2 a stage."""
    if models.encoder_name(model_config) == "vit":
        return models.parse_variant(model_config.variant)[1]
    stages = len(models.RESNET_LAYOUTS[int(model_config.depth)][1])
    return (4 if model_config.stem == "imagenet" else 1) * 2 ** (stages - 1)


def check_fits(model_config: ml_collections.ConfigDict, image_size: int, who: str) -> None:
    """Refuses an input a ViT cannot cut into patches, or too small for a ResNet's stages."""
    stride = total_stride(model_config)
    if models.encoder_name(model_config) == "vit" and image_size % stride:
        raise ValueError(
            f"{who} ({models.encoder_label(model_config)}) cuts {stride} px patches: the "
            f"{image_size} px input (augment.image_size) is not a multiple of {stride}"
        )
    if image_size < stride:
        raise ValueError(
            f"{who} ({models.encoder_label(model_config)}, stem={model_config.stem!r}) "
            f"downsamples by {stride}: it does not fit the {image_size} px input "
            "(augment.image_size); use a network with the CIFAR stem, or larger images"
        )


def _refuse(path: str, why: str) -> ValueError:
    return ValueError(f"distill.teacher={path}: {why}")


def _latest_step_dir(workdir: str) -> str | None:
    """The newest finished orbax step folder of `workdir/checkpoints/` (temporary ones skipped)."""
    root = checkpoint.checkpoint_dir(workdir)
    steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
    return os.path.join(root, str(max(steps))) if steps else None


def _read_state(step_dir: str) -> dict[str, Any]:
    """A saved downstream state as host arrays, read against its own metadata (any mesh)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = handler.metadata(epath.Path(step_dir) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved
        )
        restored = handler.restore(
            epath.Path(step_dir) / "state", args=ocp.args.StandardRestore(abstract)
        )
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line naming the folder
        raise checkpoint.CheckpointError(
            f"cannot read the fine-tuned network in {step_dir}: {type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}"
        ) from None
    finally:
        handler.close()
    return jax.device_get(restored)


def _from_finetune(path: str, head_layer: int) -> tuple[Any, ml_collections.ConfigDict, int]:
    """(Classifier-layout variables, architecture, head layer) of a finished fine-tune run."""
    with open(os.path.join(path, FINETUNE_RESULT)) as f:
        result = json.load(f)
    recorded = int(result["from_head_layer"])
    if head_layer not in (-1, recorded):
        raise _refuse(
            path,
            f"the fine-tune run's classifier reads head layer {recorded} (its finetune.json); "
            f"distill.teacher_head_layer={head_layer} contradicts it (leave it at -1)",
        )
    step_dir = _latest_step_dir(path)
    if step_dir is None:
        raise _refuse(path, "its checkpoints/ holds no checkpoint of the fine-tuned network")
    state = _read_state(step_dir)
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return variables, ml_collections.ConfigDict(result["model"]), recorded


def _from_export(path: str, head_layer: int) -> tuple[Any, ml_collections.ConfigDict, int]:
    """(Classifier-layout variables, architecture, head layer) of an export with a classifier."""
    variables, meta = checkpoint.load_export(path)
    params, stats = variables["params"], variables.get("batch_stats") or {}
    if "linear_head" not in params:
        raise _refuse(
            path,
            "the export has no classifier head (params/linear_head): a pretraining export "
            "cannot teach; fine-tune it (--mode=finetune) and pass that run's workdir",
        )
    if head_layer < 0:  # the import and distill record the classifier's input
        recorded = (meta.get("source") or {}).get("supervised_head") or {}
        head_layer = int(recorded.get("head_layer", 0))
    params = {k: v for k, v in params.items() if k != "linear_head"}
    params["classifier"] = variables["params"]["linear_head"]["dense"]
    model_config = ml_collections.ConfigDict(meta["model"])
    return {"params": params, "batch_stats": stats}, model_config, head_layer


def _locate(path: str) -> tuple[str, str]:
    """(the teacher's folder, 'export' | 'finetune'); a one-line error for anything else."""
    if os.path.exists(os.path.join(path, "export.json")):
        return path, "export"
    if os.path.exists(os.path.join(path, FINETUNE_RESULT)):
        return path, "finetune"
    if os.path.exists(os.path.join(checkpoint.export_dir(path), "export.json")):
        return checkpoint.export_dir(path), "export"  # e.g. an --mode=import_official workdir
    if config_base.saved_job(path) == "finetune":
        raise _refuse(path, "the fine-tuning has not finished (no finetune.json); resume it first")
    raise _refuse(
        path,
        "neither an export (export.json) nor a finished fine-tune run (finetune.json); pass a "
        "--mode=finetune workdir or an export with a classifier head",
    )


def load_teacher(config: ml_collections.ConfigDict, num_classes: int) -> Teacher:
    """`config.distill.teacher` as a checked, frozen Teacher for a dataset of `num_classes`."""
    given = config.distill.teacher
    if not given:
        raise ValueError(
            "--mode=distill needs --config.distill.teacher=PATH: a --mode=finetune workdir or an "
            "export with a classifier head (e.g. an imported fine-tuned SimCLR v2 checkpoint)"
        )
    path, kind = _locate(os.path.abspath(given))
    read = _from_finetune if kind == "finetune" else _from_export
    variables, model_config, head_layer = read(path, int(config.distill.teacher_head_layer))
    model_config.dtype = config.model.dtype  # the run's compute precision, not the teacher's
    kernel = np.shape(variables["params"]["classifier"]["kernel"])
    if kernel[-1] != num_classes:
        raise _refuse(
            path,
            f"its classifier has {kernel[-1]} classes, dataset {config.dataset!r} has "
            f"{num_classes}: a teacher must be fine-tuned on the dataset it distils",
        )
    if not 0 <= head_layer <= model_config.head_layers:
        raise _refuse(
            path,
            f"distill.teacher_head_layer={head_layer} is beyond its {model_config.head_layers}-"
            "layer projection head",
        )
    check_fits(model_config, config.augment.image_size, f"distill.teacher={path}")
    model = classifier.build_classifier(model_config, head_layer, num_classes, freeze=False)
    teacher = Teacher(model, model_config, {}, head_layer, num_classes, path, kind)
    checked = _checked(model, variables, teacher, config.augment.image_size)
    return dataclasses.replace(teacher, variables=checked)


def _checked(
    model: classifier.Classifier, variables: dict[str, Any], teacher: Teacher, image_size: int
) -> dict[str, Any]:
    """The variables the model uses, each leaf's shape checked; the classifier's too."""
    source = classifier.Source(teacher.model_config, variables, teacher.path)
    out = classifier.initial_variables(model, source, image_size)  # checks encoder and head
    want = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), False)
    )["params"]["classifier"]
    have = variables["params"]["classifier"]
    if set(have) != set(want) or any(np.shape(have[k]) != want[k].shape for k in want):
        got = tuple(np.shape(have.get("kernel")))
        raise _refuse(
            teacher.path,
            f"its classifier kernel {got} does not fit the network's output after "
            f"{teacher.head_layer} projection-head layer(s), which needs {want['kernel'].shape}; "
            "set distill.teacher_head_layer to the layer it was fine-tuned from",
        )
    out["params"]["classifier"] = {k: np.asarray(v) for k, v in have.items()}
    return out


def teacher_shardings(config: ml_collections.ConfigDict, teacher: Teacher, mesh: Any) -> Any:
    """The teacher's variables' shardings split over 'data' (FSDP-style), or None: replicated.

    `distill.shard_teacher`: 'replicated', 'sharded', or 'auto' (sharded above
    SHARD_TEACHER_BYTES). Sharded, each device stores 1/n of the large leaves and XLA gathers
    them inside the step's forward: the same logits, less memory, more communication.
    """
    mode = config.distill.shard_teacher
    if mode == "auto":
        large = parallel.tree_bytes(teacher.variables) > SHARD_TEACHER_BYTES
        mode = "sharded" if large else "replicated"
    if mode == "replicated" or mesh.devices.size == 1:
        return None
    return parallel.fsdp_shardings(teacher.variables, mesh)
