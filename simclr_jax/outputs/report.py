"""A run report: PNG curves of `metrics.jsonl`, the evaluation table and one `index.html`.

    python -m simclr_jax.main --config=configs/digits.py --workdir=runs/digits --mode=report

writes `runs/digits/report/`. It reads only the workdir's files (no checkpoint, no device), so
it works on a run still in progress, one whose metrics file has a torn last line (a crash or a
copy mid-write), and one whose rows lack some keys (older versions, other methods).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from simclr_jax.runtime import files

log = logging.getLogger(__name__)

REPORT_DIR = "report"
# Every plot is PLOT_SIZE pixels (width, height): fixed, so pages and tests can rely on it.
PLOT_SIZE = (640, 400)
_DPI = 100

# (file stem, title, metric keys). The first five are always listed: a missing one is named.
CORE_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "contrastive loss (NT-Xent)", ("loss",)),
    ("contrastive_acc", "contrastive accuracy (positive is the top logit)", ("contrastive_acc",)),
    ("lr", "learning rate", ("lr",)),
    ("linear_acc", "online linear accuracy (train batches)", ("linear_acc",)),
    ("images_per_sec", "throughput (images / s)", ("images_per_sec",)),
)
# Plotted when logged (the representation monitors among them).
OPTIONAL_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("align", "alignment of positive pairs (lower is better)", ("align",)),
    ("uniform", "uniformity on the hypersphere (lower is better)", ("uniform",)),
    ("rankme", "RankMe effective rank of the embeddings (collapse: low)", ("rankme",)),
    ("entropy", "entropy of the contrastive softmax", ("entropy",)),
    ("linear_loss", "online linear loss", ("linear_loss",)),
    ("norms", "gradient and parameter norms", ("grad_norm", "param_norm")),
)
# A downstream run's workdir (linear evaluation, fine-tuning: `job.json` names the job).
DOWNSTREAM_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "cross-entropy loss (train batches)", ("loss",)),
    ("eval_top1", "top-1 / top-5 on the whole eval split", ("eval_top1", "eval_top5")),
    ("train_top1", "top-1 on the train batches", ("train_top1",)),
    ("lr", "learning rate", ("lr",)),
    ("images_per_sec", "throughput (images / s)", ("images_per_sec",)),
    ("grad_norm", "gradient norm", ("grad_norm",)),
)
DOWNSTREAM_JOBS = ("linear_eval", "finetune", "distill")
_NOT_PLOTTED = {"step", "epoch"}
# The model keys of the other encoder family than config.model.name's, not shown.
_OTHER_ENCODER_KEYS = {
    "resnet": ("model.variant", "model.pool", "model.posemb"),
    "vit": ("model.depth", "model.width_multiplier", "model.base_width", "model.stem"),
}
# Config values shown at the top of the page (dotted paths into config.json).
KEY_CONFIG = (
    "method",
    "dataset",
    "seed",
    "batch_size",
    "total_steps",
    "num_epochs",
    "simclr.temperature",
    "model.name",
    "model.depth",
    "model.width_multiplier",
    "model.base_width",
    "model.stem",
    "model.variant",
    "model.pool",
    "model.posemb",
    "model.head_layers",
    "model.head_out_dim",
    "model.dtype",
    "optim.name",
    "optim.base_lr",
    "optim.lr_scaling",
    "optim.weight_decay",
    "optim.warmup_epochs",
    "augment.image_size",
    "augment.area_min",
    "augment.color_jitter_strength",
    "augment.blur_prob",
    "augment.solarize_prob",
)


def _number(value: Any) -> float | None:
    """A metric value as float: numbers, and the 'nan'/'inf' strings MetricWriter writes."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def read_metrics(path: str) -> list[dict[str, float]]:
    """Rows of a `metrics.jsonl`, sorted by step; torn or garbled lines are skipped.

    A resumed run appends to the file, so a step can appear twice: the later row wins.
    """
    if not os.path.exists(path):
        return []
    by_step: dict[float, dict[str, float]] = {}
    with open(path, errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                # Typically the last line of a file that is being written or was cut by a crash.
                log.warning("%s:%d is not valid JSON (torn line?); skipped", path, lineno)
                continue
            if not isinstance(raw, dict) or _number(raw.get("step")) is None:
                log.warning("%s:%d has no step; skipped", path, lineno)
                continue
            row = {k: v for k, v in ((k, _number(v)) for k, v in raw.items()) if v is not None}
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _read_json(path: str) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or unreadable (logged)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("cannot read %s (%s); leaving it out of the report", path, e)
        return None
    return value if isinstance(value, dict) else None


def _get(config: dict[str, Any], dotted: str) -> Any:
    """`config['a']['b']` for 'a.b'; None when absent."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def steps_per_epoch(rows: Sequence[dict[str, float]], config: dict[str, Any]) -> float | None:
    """Steps per epoch from the logged `epoch` column, else from the dataset size and batch."""
    ratios = [r["step"] / r["epoch"] for r in rows if r.get("epoch", 0) > 0 and r["step"] > 0]
    if ratios:
        return sorted(ratios)[len(ratios) // 2]
    batch = _get(config, "batch_size")
    if not config or not batch:
        return None
    try:  # the dataset's size: metadata only, but a tfds dataset may not be on this machine
        import ml_collections

        from simclr_jax import data

        info = data.dataset_info(ml_collections.ConfigDict(config))
        return float(max(info.num_train_examples // int(batch), 1))
    except Exception as e:  # noqa: BLE001 - the epoch axis is optional; the report is not
        log.info("no epoch axis: cannot size the dataset (%s: %s)", type(e).__name__, e)
        return None


def _new_figure() -> tuple[Any, Any]:
    """A PLOT_SIZE figure and its axes, without pyplot (no global state, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI, layout="constrained")
    return fig, fig.subplots()


def _save(fig: Any, path: str) -> str:
    """Saves at exactly PLOT_SIZE (no bbox_inches='tight', which would change it) via rename."""
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=_DPI, format="png")
    os.replace(tmp, path)
    return path


def plot_metric(
    rows: Sequence[dict[str, float]],
    keys: Sequence[str],
    title: str,
    path: str,
    spe: float | None = None,
) -> str:
    """Line plot of `keys` against step (epochs on the top axis when `spe` is known)."""
    fig, ax = _new_figure()
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, marker="." if len(pts) < 50 else None, label=key)
    finite = [r[k] for r in rows for k in keys if k in r and math.isfinite(r[k])]
    if len(keys) > 1:
        ax.legend(loc="best")
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")  # norms of very different sizes
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if spe:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch")
    return _save(fig, path)


def eval_kinds(results: dict[str, Any]) -> list[str]:
    """The evaluations in an eval.json: entries with a number per encoder (not 'tasks')."""
    return [
        k
        for k, v in results.items()
        if isinstance(v, dict) and any(_number(x) is not None for x in v.values())
    ]


def plot_eval(results: dict[str, Any], path: str) -> str:
    """Grouped bars: random-init vs pretrained accuracy for each evaluation."""
    fig, ax = _new_figure()
    kinds = eval_kinds(results)
    encoders = ("random_init", "pretrained")
    width = 0.38
    for i, enc in enumerate(encoders):
        values = [_number(results[k].get(enc)) or 0.0 for k in kinds]
        xs = [j + (i - 0.5) * width for j in range(len(kinds))]
        bars = ax.bar(xs, values, width, label=enc.replace("_", " "))
        ax.bar_label(bars, fmt="%.3f", padding=2)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0, 1.25)  # room above the bar labels for the legend
    ax.set_ylabel("accuracy / rho")
    ax.set_title("random-init vs pretrained encoder")
    ax.legend(loc="upper center", ncols=2)
    return _save(fig, path)


def _plan(
    rows: Sequence[dict[str, float]], downstream: bool = False
) -> list[tuple[str, str, tuple[str, ...]]]:
    """The plots to draw: core and optional ones with data, then any other logged metric."""
    logged = {k for r in rows for k in r}
    plots = DOWNSTREAM_PLOTS if downstream else CORE_PLOTS + OPTIONAL_PLOTS
    known = {k for _, _, keys in plots for k in keys}
    plan = [p for p in plots if logged & set(p[2])]
    # A metric added later (another method, a new monitor) gets a plot without touching this file.
    plan += [(k, k, (k,)) for k in sorted(logged - known - _NOT_PLOTTED)]
    return plan


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """An HTML table of already-formatted cells (escaped here)."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(value: Any) -> str:
    """Short display of a number or config value."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return (
        json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
    )


def _progress(rows: Sequence[dict[str, float]], config: dict[str, Any], spe: float | None) -> str:
    """'step 120 of 400 (30%)' from the last row and the configured length."""
    if not rows:
        return "no metrics logged yet"
    last = int(rows[-1]["step"])
    total = _get(config, "total_steps") or 0
    if not total and spe and _get(config, "num_epochs"):
        total = int(float(config["num_epochs"]) * spe)
    if not total:
        return f"step {last}"
    return f"step {last} of {int(total)} ({100 * last / total:.0f}%)"


def _html(
    workdir: str,
    config: dict[str, Any],
    rows: Sequence[dict[str, float]],
    images: Sequence[tuple[str, str]],
    missing: Sequence[str],
    eval_results: dict[str, Any] | None,
    spe: float | None,
    downstream: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The report page: status, key config, evaluation table, every plot, the full config."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>simclr_jax report: {esc(os.path.basename(os.path.abspath(workdir)))}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:left}img{margin:4px;border:1px solid #eee}"
        ".grid{display:flex;flex-wrap:wrap}</style></head><body>",
        f"<h1>SimCLR run report: {esc(os.path.abspath(workdir))}</h1>",
        f"<p>{esc(_progress(rows, config, spe))}; report written "
        f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. Rerun <code>--mode=report</code> to "
        "refresh.</p>",
    ]
    if downstream:
        parts.append("<h2>Downstream results (whole eval split)</h2>")
        keys = ("top1", "top5", "knn_top1", "epochs", "num_labels", "steps", "source")
        table = [[job] + [_fmt(r.get(k, "")) for k in keys] for job, r in downstream.items()]
        parts.append(_table(table, ["job", *keys]))
    if eval_results:
        parts.append("<h2>Evaluation (random-init vs pretrained encoder)</h2>")
        kinds = eval_kinds(eval_results)
        table = [
            [k] + [_fmt(_number(eval_results[k].get(e))) for e in ("random_init", "pretrained")]
            for k in kinds
        ]
        parts.append(_table(table, ["evaluation", "random init", "pretrained"]))
    elif not downstream:
        parts.append("<h2>Evaluation (random-init vs pretrained encoder)</h2>")
        parts.append("<p>No eval.json yet: it is written at the end of pretraining.</p>")
    parts.append("<h2>Key config values</h2>")
    hidden = _OTHER_ENCODER_KEYS.get(_get(config, "model.name") or "resnet", ())
    shown = [k for k in KEY_CONFIG if _get(config, k) is not None and k not in hidden]
    if _get(config, "total_steps"):  # total_steps > 0 overrides num_epochs: do not show both
        shown = [k for k in shown if k != "num_epochs"]
    parts.append(_table([[k, _fmt(_get(config, k))] for k in shown]))
    if rows:
        last = rows[-1]
        parts.append(f"<h2>Latest metrics (step {int(last['step'])})</h2>")
        parts.append(_table([[k, _fmt(v)] for k, v in last.items() if k != "step"]))
    parts.append("<h2>Curves</h2>")
    if missing:
        parts.append(f"<p>Not logged (yet): {esc(', '.join(missing))}.</p>")
    parts.append('<div class="grid">')
    for name, title in images:
        # Plots are PLOT_SIZE; the augmentation grid has its own size.
        size = "" if name == "augment.png" else f' width="{PLOT_SIZE[0]}" height="{PLOT_SIZE[1]}"'
        parts.append(
            f'<a href="{esc(name)}"><img src="{esc(name)}" alt="{esc(title)}" '
            f'title="{esc(title)}"{size}></a>'
        )
    parts.append("</div>")
    parts.append("<h2>Full config</h2><details><summary>config.json</summary><pre>")
    parts.append(esc(json.dumps(config, indent=2, sort_keys=True)))
    parts.append("</pre></details></body></html>")
    return "\n".join(parts) + "\n"


def write_report(workdir: str) -> str:
    """Writes `workdir/report/` (PNG plots + `index.html`) from the run's files; returns the page.

    Missing files and keys shrink the report instead of failing it, so it can run at any time.
    """
    out = os.path.join(workdir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    eval_results = _read_json(os.path.join(workdir, "eval.json"))
    spe = steps_per_epoch(rows, config)
    job = (_read_json(os.path.join(workdir, "job.json")) or {}).get("job")
    results = {j: _read_json(os.path.join(workdir, f"{j}.json")) for j in DOWNSTREAM_JOBS}
    downstream = {j: r for j, r in results.items() if r}

    images: list[tuple[str, str]] = []
    for stem, title, keys in _plan(rows, downstream=job in DOWNSTREAM_JOBS):
        plot_metric(rows, keys, title, os.path.join(out, f"{stem}.png"), spe)
        images.append((f"{stem}.png", title))
    # A linear evaluation of this pretraining run keeps its own metrics in linear_eval/.
    sub = read_metrics(os.path.join(workdir, "linear_eval", "metrics.jsonl"))
    if sub and job not in DOWNSTREAM_JOBS:  # a pretraining run (job.json says "pretrain")
        for stem, title, keys in _plan(sub, downstream=True)[:2]:
            name = f"linear_eval_{stem}.png"
            plot_metric(sub, keys, f"linear eval: {title}", os.path.join(out, name), None)
            images.append((name, f"linear eval: {title}"))
    if eval_results:
        plot_eval(eval_results, os.path.join(out, "eval.png"))
        images.insert(0, ("eval.png", "random-init vs pretrained encoder"))
    if os.path.exists(os.path.join(out, "augment.png")):  # from --mode=preview_augment
        images.append(("augment.png", "augmentation preview"))
    logged = {k for r in rows for k in r}
    core = DOWNSTREAM_PLOTS[:3] if job in DOWNSTREAM_JOBS else CORE_PLOTS
    missing = [stem for stem, _, keys in core if not logged & set(keys)]
    page = _html(workdir, config, rows, images, missing, eval_results, spe, downstream)
    index = os.path.join(out, "index.html")
    files.write_text_atomic(index, page)
    return index
