"""The resume diff: which saved-config differences would change what a resumed job computes."""

from __future__ import annotations

from typing import Any

from simclr_jax.config.moved import migrate

# Keys that change only cadence, resources or paths: every job may change them on resume.
COMMON_SAFE_KEYS: tuple[str, ...] = (
    "log_every_steps",
    "monitor_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "keep_period",
    "data.prefetch",
    "data.num_threads",
    "data.read_threads",
    "data.max_bad_fraction",  # decides only whether a run with bad files stops
    "data.data_dir",
    "data.manual_dir",
    "distributed.",
)
# A text run's tokenizer is WORKDIR/tokenizer.json from its first start on: on resume these
# keys, which only shape a tokenizer still to be trained (or name one to copy), change nothing.
_TOKENIZER_KEYS = ("data.lowercase", "data.tokenizer_train_examples", "data.tokenizer")
# Per job, what else it never reads while training: pretraining's end-of-run evaluation reruns in
# full on resume, and downstream jobs' evaluation batch and cadence do not change their result.
_DOWNSTREAM_EXTRA = ("finetune.eval_every_epochs", "eval.batch_size")
RESUME_SAFE_KEYS: dict[str, tuple[str, ...]] = {
    "pretrain": COMMON_SAFE_KEYS
    + _TOKENIZER_KEYS
    + ("eval.", "init_from", "finetune.", "distill."),
    "linear_eval": COMMON_SAFE_KEYS + _DOWNSTREAM_EXTRA,
    "finetune": COMMON_SAFE_KEYS + _DOWNSTREAM_EXTRA,
    "distill": COMMON_SAFE_KEYS
    + ("distill.eval_every_epochs", "distill.shard_teacher", "eval.batch_size"),
}


def safe_keys(job: str) -> tuple[str, ...]:
    """`job`'s resume-safe key prefixes; ValueError naming the known jobs otherwise."""
    if job not in RESUME_SAFE_KEYS:
        raise ValueError(f"job={job!r} is not one of {sorted(RESUME_SAFE_KEYS)}")
    return RESUME_SAFE_KEYS[job]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as `{'a.b.c': value}` (dotted keys, as `--config.a.b.c` names them)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(
    saved: dict[str, Any],
    new: dict[str, Any],
    defaults: dict[str, Any],
    safe_keys: tuple[str, ...],
) -> list[str]:
    """Lines `key: saved -> new` for every key outside `safe_keys` whose value differs.

    Nested or flat dicts. The saved config's moved keys are renamed first (runs saved before a
    move resume); a key the saved run predates counts as its value in `defaults`, since code
    without the key behaved as its default does.
    """
    a, b = migrate(flatten(saved)), flatten(new)
    flat_defaults = flatten(defaults)
    a.update({k: flat_defaults[k] for k in set(b) - set(a) if k in flat_defaults})
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(safe_keys) or a.get(key) == b.get(key):
            continue
        lines.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return lines
