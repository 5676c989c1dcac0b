"""`--mode=finetune`: fine-tuning a pretrained encoder on (a subset of) the labels, resumable.

The whole network, or from projection-head layer k (SimCLR v2's `from_head_layer`), with global
BN, LARS or momentum SGD and warm-up + cosine over `config.finetune.epochs`, on the streamed train
split: all labels, a class-balanced seeded `label_fraction`, or a `subset` (ImageNet's official
1% / 10%: tfds `imagenet2012_subset/1pct|10pct`; or a file of image names for an image folder,
as google-research/simclr `imagenet_subsets/*.txt`). Checkpoints in `WORKDIR/checkpoints/`;
top-1 / top-5 on the whole eval split every `eval_every_epochs` and at the end, in
`WORKDIR/finetune.json`. A text encoder trains on a labelled text dataset's token ids (its own
tokenizer, no augmentation).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from simclr_jax import config_base, data
from simclr_jax.data import labelled
from simclr_jax.evals import classifier, classifier_run
from simclr_jax.runtime import parallel

log = logging.getLogger(__name__)


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Class-balanced seeded subset: round(fraction * n_c) (at least 1) indices of each class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"config.finetune.label_fraction={fraction!r} must be in (0, 1]")
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 7])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def selection(config: ml_collections.ConfigDict) -> tuple[np.ndarray | None, str]:
    """(train indices to use or None, official subset name or '') of `config.finetune`."""
    f = config.finetune
    if f.subset:
        if f.subset in labelled.OFFICIAL_SUBSETS:
            labelled.labelled_size(
                config, "train", subset=f.subset
            )  # refuses a non-ImageNet dataset
            return None, f.subset
        return labelled.subset_indices(config, f.subset), ""
    if f.label_fraction < 1:
        return label_subset(labelled.train_labels(config), f.label_fraction, config.seed), ""
    return None, ""


def finetune(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> dict[str, Any]:
    """Fine-tunes the export at `config.init_from`; writes `workdir/finetune.json`.

    Returns the result: `top1`, `top5`, `num_labels`, `epochs`, `steps`, `history`, ...
    """
    config_base.validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.make_mesh()
    source = classifier.load_source(config, "finetune")
    classifier.report_overrides(config, source)
    config = classifier.text_config(config, source, "finetune")
    info = data.dataset_info(config)
    f = config.finetune
    if f.from_head_layer > 0 and not source.variables["params"].get("head"):
        raise config_base.ConfigError(
            f"finetune.from_head_layer={f.from_head_layer} is invalid: {source.path} has no "
            "projection head (e.g. a CPC export); use 0"
        )
    model = classifier.build_classifier(
        source.model_config, f.from_head_layer, info.num_classes, freeze=False
    )
    variables = classifier.initial_variables(model, source, config.augment.image_size)
    keep, subset = selection(config)
    run = classifier_run.ClassifierRun(
        "finetune",
        model,
        variables,
        f,
        keep=keep,
        subset=subset,
        eval_every_epochs=f.eval_every_epochs,
    )
    result = classifier_run.run_classifier(
        config, run, mesh, workdir, allow_change=allow_config_change
    )
    if result["preempted"]:
        return result
    result.update(
        source=os.path.abspath(source.path),
        job="finetune",
        label_fraction=float(f.label_fraction),
        subset=f.subset,
        from_head_layer=int(f.from_head_layer),
        model=source.model_config.to_dict(),
        config=classifier.config_as_run(config, source),
    )
    classifier.write_result(workdir, "finetune", result)
    if jax.process_index() == 0:
        print(
            f"fine-tuned top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
            f"({result['num_labels']} labels, {f.epochs:g} epochs, {source.path})",
            flush=True,
        )
    return result
