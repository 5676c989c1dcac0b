"""`--mode=linear_eval`: the SimCLR linear-evaluation protocol as a streamed, resumable run.

A zero-initialised linear classifier on the frozen encoder's pooled features (BN in inference
mode, stop-gradient), trained on the streamed train split with the device's random resized crop
+ flip, momentum SGD (Nesterov) or LARS, then top-1 / top-5 on the whole eval split (centre crop)
and the weighted kNN. Keys: `config.linear_eval.*`; results: `WORKDIR/linear_eval.json`.
A text encoder reads a labelled text dataset's token ids with its own tokenizer (no crop).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections

from simclr_jax import config_base, data
from simclr_jax.evals import classifier, classifier_run, knn, probe
from simclr_jax.runtime import parallel

log = logging.getLogger(__name__)


def run_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the run keeps checkpoints and metrics: the workdir, or `workdir/linear_eval/` when
    it evaluates the workdir's own pretraining checkpoint."""
    return workdir if config.init_from else os.path.join(workdir, "linear_eval")


def linear_eval(
    config: ml_collections.ConfigDict,
    workdir: str,
    source: classifier.Source,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Linear evaluation of the frozen encoder `source` (an export or a pretraining state)."""
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    classifier.report_overrides(config, source)
    config = classifier.text_config(config, source, "linear_eval")
    info = data.dataset_info(config)
    model = classifier.build_classifier(source.model_config, 0, info.num_classes, freeze=True)
    variables = classifier.initial_variables(model, source, config.augment.image_size)
    section = config.linear_eval
    if section.precompute_features:
        result = _fast_probe(config, model, variables, mesh, info.num_classes)
    else:
        run = classifier_run.ClassifierRun("linear_eval", model, variables, section)
        result = classifier_run.run_classifier(
            config, run, mesh, run_dir(config, workdir), allow_change=allow_config_change
        )
        if result["preempted"]:
            return result
        if section.knn:
            k = knn.knn_evaluate(
                classifier.apply_encoder(model),
                result["variables"],
                config,
                mesh,
                info.num_classes,
            )
            result.update(knn_top1=k["top1"], knn_top5=k["top5"])
    result.update(
        source=os.path.abspath(source.path),
        job="linear_eval",
        model=source.model_config.to_dict(),
        config=classifier.config_as_run(config, source),
    )
    classifier.write_result(workdir, "linear_eval", result)
    if jax.process_index() == 0:
        knn_text = f"   kNN top-1 {result['knn_top1']:.4f}" if section.knn else ""
        print(
            f"linear eval top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}{knn_text}  "
            f"({result['num_labels']} labels, {section.epochs:g} epochs, {source.path})",
            flush=True,
        )
    return result


def _fast_probe(
    config: ml_collections.ConfigDict,
    model: classifier.Classifier,
    variables: dict[str, Any],
    mesh: Any,
    num_classes: int,
) -> dict[str, Any]:
    """`linear_eval.precompute_features`: one feature pass per split, the probe and kNN on them."""
    apply_fn = classifier.apply_encoder(model)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    banks = [knn.feature_bank(apply_fn, variables, config, mesh, s) for s in ("train", "test")]
    section = config.linear_eval
    lin = probe.probe_on_banks(config, banks, num_classes, section, mesh)
    result = {**lin, "epochs": float(section.epochs), "precompute_features": True}
    if section.knn:
        k = knn.knn_on_banks(
            *banks,
            mesh,
            k=config.eval.knn_k,
            temperature=config.eval.knn_temperature,
            num_classes=num_classes,
        )
        result.update(knn_top1=k["top1"], knn_top5=k["top5"])
    return result
