"""Recipe sweep for the digits default: each recipe's linear / kNN accuracy and wall-clock.

    python benchmarks/digits_sweep.py                          # every recipe below
    python benchmarks/digits_sweep.py --recipes=default,adamw  # a few of them
    python benchmarks/digits_sweep.py --extra=--config.total_steps=200
    python benchmarks/digits_sweep.py --config=configs/byol_digits.py --recipes=default
    python benchmarks/digits_sweep.py --recipes=default --seeds=0,1,2 \
        --xla_flags=--xla_cpu_experimental_ynn_fusion_type=dot,reduce
    python benchmarks/digits_sweep.py --dry_run                # parse and check every recipe

Each recipe is the whole README command (a), `python -m simclr_jax.main
--config=configs/digits.py` plus its overrides, run in a fresh subprocess and workdir, so a row
is what a newcomer would see:
pretraining, then the end-of-run evaluation (the same protocol for every row: linear eval and
weighted kNN with k=200, T=0.1 on the digits test split). Columns: the pretrained encoder's
`linear` and `knn` accuracy from `eval.json` (random init in brackets), and `wall s`, the
subprocess's wall-clock time. With `--seeds` every recipe runs once per seed and a summary row
gives the lowest and mean kNN over them: at 400 steps the run is chaotic, and a seed moves it as
much as a change of XLA's summation order does (`--xla_flags`, set in each subprocess's
`XLA_FLAGS`, where it wins over `platform_flags.CPU_FLAGS`). The test split is the one the
README reports; no recipe here was chosen on anything but this table. `--dry_run` runs nothing:
it parses every chosen recipe's command line as `simclr_jax.main` does and validates its config,
so a renamed config key fails here in seconds instead of an hour into a sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The first sweep's rows all ran 400 steps. The digits default before it: LARS 1.0 x B/256,
# 5 warm-up epochs, t = 0.2, crops >= 0.25.
LARS = [
    "--config.total_steps=400",
    "--config.optim.name=lars",
    "--config.optim.base_lr=1.0",
    "--config.optim.lr_scaling=linear",
    "--config.optim.warmup_epochs=5",
    "--config.augment.area_min=0.25",
    "--config.simclr.temperature=0.2",
]
# AdamW at a fixed LR (no batch scaling), t = 0.2: DESIGN.md's measured kNN 0.956 override; the
# rows below it change one thing each.
ADAMW = [
    "--config.total_steps=400",
    "--config.optim.name=adamw",
    "--config.optim.base_lr=0.004",
    "--config.optim.lr_scaling=none",
    "--config.optim.weight_decay=1e-4",
    "--config.optim.warmup_epochs=8",
    "--config.augment.area_min=0.2",
    "--config.simclr.temperature=0.2",
]
LR2 = [*ADAMW, "--config.optim.base_lr=0.002"]

RECIPES: dict[str, list[str]] = {
    "default": [],  # = adamw_lr0.002_t0.3 at 600 steps, crops >= 0.3 (= area0.3 before 12-03)
    "lars": LARS,
    "lars_lr0.5": [*LARS, "--config.optim.base_lr=0.5"],
    "adamw": ADAMW,
    "adamw_t0.1": [*ADAMW, "--config.simclr.temperature=0.1"],
    "adamw_t0.3": [*ADAMW, "--config.simclr.temperature=0.3"],
    "adamw_wd0.05": [*ADAMW, "--config.optim.weight_decay=0.05"],
    "adamw_600": [*ADAMW, "--config.total_steps=600"],
    "adamw_lr0.002": LR2,
    "adamw_lr0.002_seed1": [*LR2, "--config.seed=1"],
    "adamw_lr0.002_seed2": [*LR2, "--config.seed=2"],
    "adamw_lr0.002_t0.3": [*LR2, "--config.simclr.temperature=0.3"],
    "adamw_lr0.002_t0.3_seed1": [*LR2, "--config.simclr.temperature=0.3", "--config.seed=1"],
    "adamw_lr0.002_t0.3_seed2": [*LR2, "--config.simclr.temperature=0.3", "--config.seed=2"],
    # The sweep under YNNPACK's reductions (docs/benchmarks_history.md): the 400-step default of
    # before (= adamw_lr0.002_t0.3), one temperature at 400 steps, and 800 steps.
    "400": ["--config.total_steps=400", "--config.augment.area_min=0.2"],
    "400_t0.5": [
        "--config.total_steps=400",
        "--config.augment.area_min=0.2",
        "--config.simclr.temperature=0.5",
    ],
    "800": ["--config.total_steps=800", "--config.augment.area_min=0.2"],
    # Issue 17 item 1's linear margin (2026-12-03): the 600-step default of before (crops >= 0.2)
    # with one change each; area0.3 became the default.
    "area0.2": ["--config.augment.area_min=0.2"],
    "t0.2": ["--config.augment.area_min=0.2", "--config.simclr.temperature=0.2"],
    "area0.3": ["--config.augment.area_min=0.3"],
    "area0.4": ["--config.augment.area_min=0.4"],
    "head256": [
        "--config.augment.area_min=0.2",
        "--config.model.head_hidden_dim=256",
        "--config.model.head_out_dim=128",
    ],
    "area0.3_head256": [
        "--config.augment.area_min=0.3",
        "--config.model.head_hidden_dim=256",
        "--config.model.head_out_dim=128",
    ],
    # A wider encoder (192 features) at 400 steps: about 1.5x the default's pretraining time.
    "width24_400": ["--config.model.base_width=24", "--config.total_steps=400"],
}


def recipe_config(name: str, overrides: list[str], config: str = "configs/digits.py") -> Any:
    """The config a recipe's run would train with: `--config` and the overrides parsed as
    `simclr_jax.main` parses them (ml_collections' config flag, locked), then validated."""
    from absl import flags
    from ml_collections import config_flags

    from simclr_jax import config_base

    path = config if os.path.isabs(config) else os.path.join(ROOT, config)
    argv = [f"digits_sweep:{name}", f"--config={path}", *overrides]
    values = flags.FlagValues()  # not absl's global FLAGS: each recipe parses from scratch
    # sys_argv: ml_collections finds the overrides to define in it (else in sys.argv).
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"recipe {name}: bad override ({type(e).__name__}: {msg})") from None
    config_base.validate_config(values.config)
    return values.config


def run_recipe(
    name: str,
    overrides: list[str],
    extra: list[str],
    config: str = "configs/digits.py",
    xla_flags: str = "",
    workdir_root: str = "",
) -> dict[str, object]:
    """Runs one recipe end to end in a fresh workdir; returns its table row.

    The workdir is temporary, or a new `workdir_root/<name>_*` that is kept (its `workdir`).
    """
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    with contextlib.ExitStack() as cleanup:
        if workdir_root:
            os.makedirs(workdir_root, exist_ok=True)
            workdir = tempfile.mkdtemp(prefix=f"{name}_", dir=workdir_root)
        else:
            scratch = tempfile.TemporaryDirectory(prefix=f"sweep_{name}_")
            workdir = cleanup.enter_context(scratch)
        cmd = [
            sys.executable,
            "-m",
            "simclr_jax.main",
            f"--config={config}",
            f"--workdir={workdir}",
            *overrides,
            *extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            return {"recipe": name, "error": tail[0] if tail else f"exit {proc.returncode}"}
        with open(os.path.join(workdir, "eval.json")) as f:
            ev = json.load(f)
    return {
        "recipe": name,
        "linear": ev["linear"]["pretrained"],
        "linear_random": ev["linear"]["random_init"],
        "knn": ev["knn"]["pretrained"],
        "knn_random": ev["knn"]["random_init"],
        "wall_s": wall,
        "workdir": workdir if workdir_root else "",
    }


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    p.add_argument("--extra", action="append", default=[], help="override added to every recipe")
    p.add_argument(
        "--config",
        default="configs/digits.py",
        help="the config the recipes override (e.g. configs/byol_digits.py)",
    )
    p.add_argument("--seeds", default="", help="comma-separated seeds: each recipe once per seed")
    p.add_argument("--xla_flags", default="", help="added to XLA_FLAGS in every run")
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="run nothing: parse and validate every chosen recipe's config (with --extra, --seeds)",
    )
    p.add_argument("--workdir_root", default="", help="keep each run's workdir under this folder")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Parses flags, runs the recipes one after the other, prints the table; returns its rows.

    A failed run's row holds its `error` (the sweep goes on); with --dry_run each row holds the
    recipe's name and the overrides that were checked.
    """
    args = parser().parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        raise SystemExit(
            f"error: --seeds={args.seeds!r} is not a comma-separated list of ints"
        ) from None
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(
            f"error: --recipes={','.join(unknown)} unknown; choose from {list(RECIPES)}"
        )
    # (recipe, row label, seed override) of every run, in the order they run.
    runs = [
        (name, f"{name}_seed{seed}", [f"--config.seed={seed}"])
        if seed is not None
        else (name, name, [])
        for name in names
        for seed in seeds or [None]
    ]
    if args.dry_run:
        checked = []
        for name, label, seed_flag in runs:
            overrides = RECIPES[name] + seed_flag + args.extra
            try:
                recipe_config(label, overrides, args.config)
            except ValueError as e:  # ConfigError too: a key or value the schema refuses
                raise SystemExit(f"error: {e}") from None
            print(f"{label:<26} ok ({len(overrides)} overrides)")
            checked.append({"recipe": label, "overrides": overrides})
        return checked
    print(
        f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, {args.config}"
        f"{', XLA_FLAGS+=' + args.xla_flags if args.xla_flags else ''}"
    )
    print(f"{'recipe':<20}{'linear (rand)':>18}{'knn (rand)':>18}{'wall s':>9}")
    table = []
    for name in names:
        rows = []
        for recipe, label, seed_flag in runs:
            if recipe != name:
                continue
            row = run_recipe(
                label,
                RECIPES[name] + seed_flag,
                args.extra,
                args.config,
                args.xla_flags,
                args.workdir_root,
            )
            table.append(row)
            if "error" in row:
                print(f"{label:<20}  failed: {row['error']}", flush=True)
                continue
            rows.append(row)
            print(
                f"{label:<20}{row['linear']:>9.4f} ({row['linear_random']:.3f})"
                f"{row['knn']:>9.4f} ({row['knn_random']:.3f}){row['wall_s']:>9.0f}",
                flush=True,
            )
        if len(rows) > 1:
            lin = [r["linear"] for r in rows]
            knn = [r["knn"] for r in rows]
            print(
                f"{name + ' min/mean':<20}{min(lin):>9.4f} /{sum(lin) / len(lin):.4f}"
                f"{min(knn):>9.4f} /{sum(knn) / len(knn):.4f}",
                flush=True,
            )
    return table


if __name__ == "__main__":
    main()
