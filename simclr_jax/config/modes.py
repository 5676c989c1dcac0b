"""The `--mode` names, defined once: imports nothing, so `main` reads them before JAX starts."""

from __future__ import annotations

# `simclr_jax.modes.MODES` maps exactly these names to their entry points.
MODE_NAMES: tuple[str, ...] = (
    "pretrain",
    "linear_eval",
    "finetune",
    "distill",
    "export",
    "export_torch",
    "import_official",
    "report",
    "preview_augment",
)
