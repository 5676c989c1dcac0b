"""The run config's public face: the whole schema, its validation and the resume check.

The shared keys and their checks are `simclr_jax/config/schema.py`, the resume diff
`simclr_jax/config/resume.py`; this module adds every registered method's section
(`config.<method>`, from `simclr_jax/methods/`) and reads and writes a run dir's saved config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import jax
import ml_collections

from simclr_jax import checkpoint, methods
from simclr_jax.config import resume, schema
from simclr_jax.config.checks import ConfigError
from simclr_jax.config.moved import MOVED_KEYS
from simclr_jax.config.resume import flatten
from simclr_jax.runtime import files

__all__ = [
    "MOVED_KEYS",
    "ConfigError",
    "base_config",
    "check_resume",
    "config_diff",
    "flatten",
    "record_run",
    "sibling_config",
    "validate_config",
]
JOB_FILE = "job.json"  # {"job": name}: which job a run dir holds
CONFIG_FILE = "config.json"
_JOB_LABELS = {"pretrain": "pretraining"}  # how messages name a job


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with SimCLR ImageNet defaults; config files override a few."""
    c = schema.shared_config()
    # Each method's own section, config.<name>, from its module (read when method == name).
    for name in methods.names():
        defaults = methods.get(name).config_defaults
        if defaults is not None:
            c[name] = defaults()
    return c


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key, its value and what is allowed, for any bad value."""
    schema.check_moved(c)  # an old key first: its one line says where the key went
    method = methods.get(c.method)  # an unknown name is refused, listing the registered ones
    schema.validate_shared(c)
    check_modality(c, method.modality)
    method.validate(c)  # the method's own keys, once the shared ones are known to be sane


def check_modality(c: ml_collections.ConfigDict, method_modality: str) -> None:
    """Refuses an image method or encoder on a text dataset, or the reverse, naming both."""
    from simclr_jax.data import datasets

    data_modality = datasets.modality(c.dataset)
    if method_modality != data_modality:
        others = [n for n in methods.names() if methods.get(n).modality == data_modality]
        raise ConfigError(
            f"config.method={c.method!r} is {_a(method_modality)} method and "
            f"config.dataset={c.dataset!r} is {_a(data_modality)} dataset: use one of {others} "
            f"on {data_modality}"
        )
    text_encoder = c.model.name == "text"
    if text_encoder != (data_modality == "text"):
        allowed = "'text'" if data_modality == "text" else "'resnet' or 'vit'"
        raise ConfigError(
            f"config.model.name={c.model.name!r} does not fit config.dataset={c.dataset!r}, "
            f"{_a(data_modality)} dataset: use model.name={allowed}"
        )


def _a(word: str) -> str:
    """'an image', 'a text'."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def config_diff(saved: dict[str, Any], new: dict[str, Any], job: str = "pretrain") -> list[str]:
    """Lines `key: saved -> new` for each key whose change alters what a resumed `job` computes.

    A key the saved run predates counts as its `base_config` default (code without the key
    behaved as the default does), and a saved moved key counts under its new name.
    """
    defaults = base_config().to_dict()
    return resume.config_diff(saved, new, defaults, resume.safe_keys(job))


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (JSON types: tuples as lists)."""
    return json.loads(config.to_json_best_effort())


def saved_job(run_dir: str) -> str | None:
    """The job a run dir holds: `job.json`'s, 'pretrain' for checkpoints without it, else None."""
    marker = os.path.join(run_dir, JOB_FILE)
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f).get("job")
    # Pretraining wrote no job.json before record_run: its checkpoints mark the dir.
    return "pretrain" if os.path.isdir(checkpoint.checkpoint_dir(run_dir)) else None


def check_resume(
    config: ml_collections.ConfigDict, run_dir: str, job: str, allow_change: bool
) -> None:
    """Refuses a run dir of another job, or a saved config that differs in keys `job` computes with.

    Resume-safe keys: `config/resume.py`'s RESUME_SAFE_KEYS[job]; keys the saved run predates
    count as their defaults and moved keys under their new names. Reads, never writes.
    """
    safe = resume.safe_keys(job)  # an unknown job is refused before the dir is read
    other = saved_job(run_dir)
    if other not in (None, job):
        raise ValueError(
            f"{run_dir} holds a {_JOB_LABELS.get(other, other)} run; --mode={job} needs its own "
            "--workdir (nothing there was changed)."
        )
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    diffs = resume.config_diff(saved, _config_dict(config), base_config().to_dict(), safe)
    if diffs and not allow_change:
        lines = "\n  ".join(diffs)
        raise ValueError(
            f"{run_dir} holds a {_JOB_LABELS.get(job, job)} run with a different config; "
            f"resuming would change it:\n  {lines}\n"
            "Use another --workdir, or pass --allow_config_change to resume anyway."
        )


def record_run(config: ml_collections.ConfigDict, run_dir: str, job: str) -> None:
    """Process 0 writes `job.json` and `config.json` (a differing old one kept as config.<t>.json).

    Each atomically (temp file + rename): a run killed mid-write leaves the old file or the new.
    """
    if jax.process_index() != 0:
        return
    resume.safe_keys(job)  # refuses an unknown job name
    os.makedirs(run_dir, exist_ok=True)
    files.write_json_atomic(os.path.join(run_dir, JOB_FILE), {"job": job})
    path = os.path.join(run_dir, CONFIG_FILE)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return
        # A copy, not a rename: config.json exists at every moment, so a resume always checks.
        files.write_text_atomic(os.path.join(run_dir, f"config.{int(time.time())}.json"), old)
    files.write_text_atomic(path, text)


def sibling_config(
    config_file: str, name: str, arg: str | None = None
) -> ml_collections.ConfigDict:
    """`get_config()` of `<dir of config_file>/<name>.py`: variant configs start from a base one.

    Loads by path, so configs work from any working directory without being a package.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"simclr_config_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
