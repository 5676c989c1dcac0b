"""End-of-pretraining evaluation: a short linear evaluation + kNN, random init vs pretrained.

Both run on the classifier machinery (`classifier_run.run_classifier`, `knn.knn_evaluate`): streamed
labelled data, a classifier trained on device, a sharded kNN bank. The budget is bounded by
`config.eval.linear_epochs` and `config.data.eval_max_examples`; nothing is checkpointed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from simclr_jax import data
from simclr_jax.evals import classifier, classifier_run, knn, probe
from simclr_jax.models import describe_encoder, init_variables
from simclr_jax.runtime import files, keys, parallel
from simclr_jax.runtime.compiled import jit_init

log = logging.getLogger(__name__)


def frozen_encoder(
    source: classifier.Source, num_classes: int, image_size: int, mesh: Mesh
) -> tuple[classifier.Classifier, Any]:
    """A linear-evaluation classifier on `source` and its variables, replicated over `mesh`."""
    model = classifier.build_classifier(source.model_config, 0, num_classes, freeze=True)
    variables = classifier.initial_variables(model, source, image_size)
    return model, jax.device_put(variables, parallel.replicated(mesh))


def feature_banks(
    config: ml_collections.ConfigDict, model: classifier.Classifier, variables: Any, mesh: Mesh
) -> list[tuple[jax.Array, jax.Array]]:
    """The train and test splits' centre-crop feature banks, capped at eval_max_examples."""
    apply_fn = classifier.apply_encoder(model)
    cap = config.data.eval_max_examples
    return [
        knn.feature_bank(apply_fn, variables, config, mesh, split, 0, cap)
        for split in ("train", "test")
    ]


def probe_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.linear_eval` with the end-of-run evaluation's epochs and batch size."""
    section = config.linear_eval.copy_and_resolve_references()
    with section.unlocked():
        section.epochs = config.eval.linear_epochs
        section.batch_size = config.eval.linear_batch_size
    return section


def step0_variables(config: ml_collections.ConfigDict, model: Any) -> dict[str, Any]:
    """The pretraining run's step-0 variables (its own jitted init of fold_in(seed, 0))."""
    # Compiled as the run compiles it: the same bits (an eager op-by-op init rounds differently).
    key = keys.derive(config.seed, keys.INIT_PARAMS)
    return jit_init(lambda: init_variables(model, key, config.augment.image_size, config.model))()


def encoder_source(
    config: ml_collections.ConfigDict, variables: Any, path: str
) -> classifier.Source:
    """The encoder part of a pretraining model's `{params, batch_stats}` as a host Source."""
    enc = jax.device_get(
        {
            "params": {"encoder": variables["params"]["encoder"]},
            "batch_stats": {"encoder": variables["batch_stats"].get("encoder", {})},
        }
    )
    described = describe_encoder(config.model, enc["params"]["encoder"])
    return classifier.Source(ml_collections.ConfigDict(described), enc, path)


def evaluate_encoder(
    config: ml_collections.ConfigDict,
    source: classifier.Source,
    mesh: Mesh,
    num_classes: int,
) -> dict[str, float]:
    """`{'linear', 'linear_top5', 'knn', 'knn_top5'}` of a frozen encoder on the bounded budget.

    `eval.linear_mode='features'`: one streamed pass per split into sharded feature banks that
    serve both the fast linear probe and the kNN; 'streamed': the augmented linear evaluation
    run (`classifier_run.run_classifier`) for `eval.linear_epochs`, then the kNN.
    """
    model, variables = frozen_encoder(source, num_classes, config.augment.image_size, mesh)
    banks = feature_banks(config, model, variables, mesh)
    section = probe_section(config)
    if config.eval.linear_mode == "features":
        lin = probe.probe_on_banks(config, banks, num_classes, section, mesh)
    else:
        cap = config.data.eval_max_examples
        run = classifier_run.ClassifierRun("eval", model, variables, section, max_examples=cap)
        lin = classifier_run.run_classifier(config, run, mesh, None, show_progress=False)
    nn = knn.knn_on_banks(
        *banks,
        mesh,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
        num_classes=num_classes,
    )
    return {
        "linear": lin["top1"],
        "linear_top5": lin["top5"],
        "knn": nn["top1"],
        "knn_top5": nn["top5"],
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The random-init vs pretrained table printed at the end of a run."""
    rows = ["", f"{'encoder':<14}{'linear probe':>14}{'kNN':>10}", "-" * 38]
    for name in ("random_init", "pretrained"):
        if name in results.get("linear", {}):
            lin, knn_acc = results["linear"][name], results["knn"][name]
            rows.append(f"{name:<14}{lin:>14.4f}{knn_acc:>10.4f}")
    return "\n".join(rows)


def evaluate_run(
    config: ml_collections.ConfigDict, model: Any, state: Any, mesh: Mesh, workdir: str
) -> dict[str, dict[str, float]]:
    """Linear eval + kNN for the random-init and the pretrained encoder; writes eval.json.

    `eval.json` is `{'linear': {'random_init', 'pretrained'}, 'knn': {...}}` (top-1), plus the
    same with top-5 under 'linear_top5' / 'knn_top5'.
    """
    trained_vars = {"params": state.params, "batch_stats": state.batch_stats}
    if data.modality(config.dataset) == "text":
        return _evaluate_text_run(config, model, trained_vars, mesh, workdir)
    info = data.dataset_info(config)
    results: dict[str, dict[str, float]] = {}
    for name, variables in (
        ("random_init", step0_variables(config, model)),
        ("pretrained", trained_vars),
    ):
        source = encoder_source(config, variables, os.path.abspath(workdir))
        for kind, value in evaluate_encoder(config, source, mesh, info.num_classes).items():
            results.setdefault(kind, {})[name] = value
    if jax.process_index() == 0:
        files.write_json_atomic(os.path.join(workdir, "eval.json"), results, indent=2)
        print(format_table(results), flush=True)
    return results


def _evaluate_text_run(
    config: ml_collections.ConfigDict, model: Any, trained_vars: Any, mesh: Mesh, workdir: str
) -> dict[str, Any]:
    """STS and the linear probe of the random-init and pretrained text encoders (`text_eval`)."""
    from simclr_jax.data import tokenizer
    from simclr_jax.evals import text_eval

    def encoder(variables: Any) -> dict[str, Any]:
        return jax.device_get(
            {"params": variables["params"]["encoder"], "batch_stats": {}}  # no BN in the encoder
        )

    by_name = {
        "random_init": encoder(step0_variables(config, model)),
        "pretrained": encoder(trained_vars),
    }
    tok = tokenizer.load(os.path.join(workdir, data.TOKENIZER_FILE))
    return text_eval.evaluate_text_run(config, by_name, mesh, workdir, tok)
