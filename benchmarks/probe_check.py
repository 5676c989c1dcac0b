"""Is the end-of-run linear probe what limits a run's linear figure? It against a tuned baseline.

    python benchmarks/probe_check.py runs/digits [runs/digits_seed1 ...]

For each finished pretraining workdir (its `config.json` and `export/`), and for both encoders of
its end-of-run evaluation (the run's step-0 init and the pretrained export), the same centre-crop
feature banks feed (1) the end-of-run probe (`probe.probe_on_banks` with the run's settings: it
reproduces `eval.json`) and (2) scikit-learn's L-BFGS logistic regression on standardised
features with its L2 strength C chosen by stratified k-fold cross-validation on the train split
alone (the test split only scores the chosen C). A baseline well above the probe would mean the
probe, not the encoder, sets the figure. Prints a Markdown table; needs no TensorFlow for digits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

C_GRID = "0.01,0.03,0.1,0.3,1,3,10,100"


def host_split(bank) -> tuple[np.ndarray, np.ndarray]:
    """A feature bank `([nb, B, D], [nb, B])` as host (features, labels) without padding rows."""
    import jax

    x, y = (np.asarray(jax.device_get(a)) for a in bank)
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    return x[y >= 0], y[y >= 0]


def tuned_logistic_regression(train, test, cs: list[float], folds: int) -> dict[str, float]:
    """Test accuracy of L-BFGS logistic regression at the C of the best cross-validation score."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = host_split(train), host_split(test)
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    best = None
    for c in cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        score = float(cross_val_score(clf, xtr, ytr, cv=split).mean())
        if best is None or score > best[0]:
            best = (score, c)
    score, c = best
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    return {"cv": score, "c": c, "test": float(clf.fit(xtr, ytr).score(xte, yte))}


def check_run(workdir: str, cs: list[float], folds: int) -> list[dict[str, object]]:
    """The table rows of one workdir: random init and pretrained."""
    import ml_collections

    from simclr_jax import checkpoint, data
    from simclr_jax.evals import end_of_run as evaluate
    from simclr_jax.evals import probe
    from simclr_jax.pretrain import state as pretrain_state
    from simclr_jax.runtime import parallel

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    saved = {}
    if os.path.exists(os.path.join(workdir, "eval.json")):
        with open(os.path.join(workdir, "eval.json")) as f:
            saved = json.load(f)["linear"]
    info = data.dataset_info(config)
    mesh = parallel.make_mesh()
    exported, _ = checkpoint.load_export(checkpoint.export_dir(workdir))
    model = pretrain_state.create_model(config, info.num_classes)
    rows = []
    for name, variables in (
        ("random_init", evaluate.step0_variables(config, model)),
        ("pretrained", exported),
    ):
        source = evaluate.encoder_source(config, variables, workdir)
        clf, clf_vars = evaluate.frozen_encoder(
            source, info.num_classes, config.augment.image_size, mesh
        )
        banks = evaluate.feature_banks(config, clf, clf_vars, mesh)
        ours = probe.probe_on_banks(
            config, banks, info.num_classes, evaluate.probe_section(config), mesh
        )
        base = tuned_logistic_regression(*banks, cs, folds)
        row = {"run": os.path.basename(os.path.normpath(workdir)), "encoder": name}
        row.update(probe=ours["top1"], eval_json=saved.get(name, float("nan")))
        row.update(lr_test=base["test"], lr_c=base["c"], lr_cv=base["cv"])
        rows.append(row)
        print(
            f"| {row['run']} | {name} | {ours['top1']:.4f} | {row['eval_json']:.4f} | "
            f"{base['test']:.4f} | {base['c']:g} | {base['cv']:.4f} |",
            flush=True,
        )
    return rows


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdirs", nargs="+", help="finished pretraining workdirs (with export/)")
    p.add_argument("--cs", default=C_GRID, help="comma-separated C grid of the baseline")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds on train")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Parses flags, sets the CPU flags as simclr_jax.main does, prints the table; returns it."""
    args = parser().parse_args(argv)
    try:
        cs = [float(c) for c in args.cs.split(",") if c]
    except ValueError:
        msg = f"error: --cs={args.cs!r} is not a comma-separated list of numbers"
        raise SystemExit(msg) from None
    if not cs or min(cs) <= 0 or args.folds < 2:
        raise SystemExit(f"error: --cs={args.cs!r} / --folds={args.folds}: need C > 0, folds >= 2")
    for w in args.workdirs:
        missing = [f for f in ("config.json", "export") if not os.path.exists(os.path.join(w, f))]
        if missing:
            raise SystemExit(f"error: {w} has no {' or '.join(missing)}: not a finished run")

    from simclr_jax.runtime import platform_flags

    platform_flags.set_cpu_flags()
    print(
        "| run | encoder | end-of-run probe | eval.json | logistic regression (C by CV) | C "
        f"| {args.folds}-fold CV |\n|---|---|---|---|---|---|---|"
    )
    rows = [r for w in args.workdirs for r in check_run(w, cs, args.folds)]
    for name in ("random_init", "pretrained"):
        mine = [r for r in rows if r["encoder"] == name]
        if len(mine) > 1:
            ours, base = (np.mean([r[k] for r in mine]) for k in ("probe", "lr_test"))
            print(f"| mean of {len(mine)} | {name} | {ours:.4f} | | {base:.4f} | | |")
    return rows


if __name__ == "__main__":
    main()
