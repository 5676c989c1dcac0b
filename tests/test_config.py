"""The run config: facts stated once, moved keys refused by name, one resume check for every job."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from simclr_jax import augment, config_base, data, methods, models, modes, optim
from simclr_jax.config import moved, resume, schema
from simclr_jax.config.modes import MODE_NAMES
from simclr_jax.data import datasets
from simclr_jax.methods import simclr

JOBS = ("pretrain", "linear_eval", "finetune", "distill")


def _config(**sections) -> ml_collections.ConfigDict:
    """The base config with `section={key: value}` updates (`seed=1` for a top-level key)."""
    c = config_base.base_config()
    for key, value in sections.items():
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    return c


def _save(run_dir, config_dict, job=None, checkpoints=False):
    """A run dir as an earlier run left it: config.json, optionally job.json and checkpoints/."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config_dict, f)
    if job is not None:
        with open(os.path.join(run_dir, "job.json"), "w") as f:
            json.dump({"job": job}, f)
    if checkpoints:
        os.makedirs(os.path.join(run_dir, "checkpoints", "6"))


def _saved(config) -> dict:
    return json.loads(config.to_json_best_effort())


# --- facts stated once ---------------------------------------------------------------------------


def test_the_schema_holds_every_method_section_and_no_moved_key():
    c = config_base.base_config()
    for name in methods.names():
        if methods.get(name).config_defaults is not None:
            assert name in c, name
    assert c.simclr.to_dict() == simclr.config_defaults().to_dict()
    flat = resume.flatten(c.to_dict())
    assert not (set(moved.MOVED_KEYS) | set(moved.REMOVED_KEYS)) & set(flat)
    assert set(moved.MOVED_KEYS.values()) <= set(flat)
    config_base.validate_config(c)


def test_allowed_values_are_their_owners_constants():
    assert schema.DATASETS is datasets.DATASETS is data.DATASETS
    assert not hasattr(config_base, "DATASETS")
    cases = [
        ({"dataset": "mnist"}, "dataset='mnist'", list(datasets.DATASETS)),
        ({"model": {"depth": 19}}, "model.depth=19", sorted(models.RESNET_LAYOUTS)),
        ({"model": {"stem": "x"}}, "model.stem='x'", models.STEMS),
        ({"model": {"compat": "x"}}, "model.compat='x'", models.COMPATS),
        ({"model": {"dtype": "float16"}}, "model.dtype='float16'", list(models.DTYPES)),
        ({"optim": {"name": "adam"}}, "optim.name='adam'", optim.OPTIMIZERS),
        ({"optim": {"lr_scaling": "x"}}, "optim.lr_scaling='x'", optim.LR_SCALINGS),
        ({"finetune": {"lr_scaling": "x"}}, "finetune.lr_scaling='x'", optim.LR_SCALINGS),
        (
            {"linear_eval": {"optimizer": "adamw"}},
            "linear_eval.optimizer='adamw'",
            schema.DOWNSTREAM_OPTIMIZERS,
        ),
        ({"eval": {"linear_mode": "x"}}, "eval.linear_mode='x'", schema.LINEAR_MODES),
        (
            {"distill": {"shard_teacher": "x"}},
            "distill.shard_teacher='x'",
            schema.TEACHER_SHARDINGS,
        ),
        ({"simclr": {"loss_impl": "ring"}}, "simclr.loss_impl='ring'", simclr.LOSS_IMPLS),
    ]
    for sections, named, allowed in cases:
        with pytest.raises(config_base.ConfigError) as e:
            config_base.validate_config(_config(**sections))
        assert str(e.value).startswith(f"config.{named} is invalid"), str(e.value)
        for value in allowed:
            assert str(value) in str(e.value), (value, str(e.value))


def test_augment_defaults_come_from_augment():
    c = config_base.base_config()
    assert c.augment.to_dict() == augment.default_augment_config(c.data.image_size).to_dict()
    assert set(augment.AUGMENT_KEYS) == set(c.augment.to_dict())
    with pytest.raises(config_base.ConfigError, match=r"augment.area_min=1.5 must be in \(0, 1\]"):
        config_base.validate_config(_config(augment={"area_min": 1.5}))


def test_mode_names_are_defined_once():
    assert set(modes.MODES) == set(MODE_NAMES)
    # main reads them before it starts JAX: the module imports nothing.
    code = "import json, sys, simclr_jax.config.modes; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = ("jax", "ml_collections", "numpy")
    loaded = [m for m in json.loads(out.stdout) if m.startswith(heavy)]
    assert loaded == []


# --- moved keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("old", sorted(moved.MOVED_KEYS))
def test_a_config_that_sets_a_moved_key_is_refused_naming_the_new_one(old):
    c = config_base.base_config()  # unlocked, as a config file's get_config() builds it
    section, _, key = old.rpartition(".")
    if section:
        c[section] = ml_collections.ConfigDict({key: 1})
    else:
        c[key] = 1
    with pytest.raises(config_base.ConfigError) as e:
        config_base.validate_config(c)
    assert str(e.value) == f"config.{old} moved to config.{moved.MOVED_KEYS[old]}"


@pytest.mark.parametrize("old", sorted(moved.REMOVED_KEYS))
def test_a_config_that_sets_a_removed_key_is_refused_saying_why(old):
    c = config_base.base_config()
    section, _, key = old.rpartition(".")
    c[section][key] = 1  # an unlocked section takes the dead key, as an old config file sets it
    with pytest.raises(config_base.ConfigError) as e:
        config_base.validate_config(c)
    assert str(e.value) == f"config.{old} was removed: {moved.REMOVED_KEYS[old]}"
    assert "\n" not in str(e.value)


def test_removed_keys_are_found_in_arguments_and_source_lines():
    args = ["--config=x.py", "--config.data.shuffle_buffer=50000"]
    assert moved.moved_in_args(args) == "data.shuffle_buffer"
    assert moved.moved_in_source("    c.data.shuffle_buffer = 50_000") == "data.shuffle_buffer"


def test_a_run_saved_with_a_removed_key_resumes(tmp_path):
    saved = _saved(config_base.base_config())
    saved["data"]["shuffle_buffer"] = 50_000  # written before the key was removed
    for job in JOBS:
        run_dir = str(tmp_path / job)
        _save(run_dir, saved, job=job)
        config_base.check_resume(config_base.base_config(), run_dir, job, allow_change=False)
    assert config_base.config_diff(saved, _saved(config_base.base_config())) == []


def test_moved_keys_are_found_in_arguments_and_source_lines():
    assert moved.moved_in_args(["--config=x.py", "--config.temperature=0.1"]) == "temperature"
    assert moved.moved_in_args(["--config.loss.impl", "dense"]) == "loss.impl"
    assert moved.moved_in_args(["--config.simclr.temperature=0.1", "--temperature=1"]) is None
    assert moved.moved_in_source("    c.loss.chunk_size = 8") == "loss.chunk_size"
    assert moved.moved_in_source("    config.temperature = 0.3  # t") == "temperature"
    assert moved.moved_in_source("    c.moco.temperature = 0.2") is None
    assert moved.moved_in_source("    c.simclr.temperature = 0.2") is None


# --- check_resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("job", JOBS)
def test_check_resume_refuses_another_jobs_run_dir(tmp_path, job):
    other = "finetune" if job != "finetune" else "linear_eval"
    run_dir = str(tmp_path / "run")
    _save(run_dir, _saved(config_base.base_config()), job=other)
    with pytest.raises(ValueError, match=f"holds a {other} run; --mode={job} needs its own"):
        config_base.check_resume(config_base.base_config(), run_dir, job, allow_change=True)
    # Its own job resumes; a dir without a run is anyone's.
    config_base.check_resume(config_base.base_config(), run_dir, other, allow_change=False)
    config_base.check_resume(config_base.base_config(), str(tmp_path / "new"), job, False)


def test_a_run_dir_with_checkpoints_and_no_job_file_is_pretraining(tmp_path):
    run_dir = str(tmp_path / "run")
    _save(run_dir, _saved(config_base.base_config()), checkpoints=True)
    config_base.check_resume(config_base.base_config(), run_dir, "pretrain", False)
    for job in ("linear_eval", "finetune"):
        with pytest.raises(ValueError, match=f"holds a pretraining run; --mode={job}"):
            config_base.check_resume(config_base.base_config(), run_dir, job, False)


@pytest.mark.parametrize("job", JOBS)
def test_keys_added_after_the_run_was_saved_do_not_block_resume(tmp_path, job):
    saved = _saved(config_base.base_config())
    del saved["data"]["host_size"]  # a run saved before the key existed
    del saved["simclr"]["decoupled"]
    del saved["byol"]  # ... and before a method's section
    run_dir = str(tmp_path / "run")
    _save(run_dir, saved, job=job)
    config_base.check_resume(config_base.base_config(), run_dir, job, allow_change=False)
    # The new key away from its default is a change that run never made.
    new = _config(data={"host_crop": True, "host_size": 256})
    with pytest.raises(ValueError, match=r"data.host_crop: False -> True\n  data.host_size: 0"):
        config_base.check_resume(new, run_dir, job, allow_change=False)


@pytest.mark.parametrize("job", JOBS)
def test_a_real_change_is_refused_listing_it_unless_allowed(tmp_path, job):
    run_dir = str(tmp_path / "run")
    _save(run_dir, _saved(config_base.base_config()), job=job)
    new = _config(seed=1, simclr={"temperature": 0.5}, log_every_steps=7)
    with pytest.raises(ValueError) as e:
        config_base.check_resume(new, run_dir, job, allow_change=False)
    msg = str(e.value)
    assert "seed: 0 -> 1" in msg and "simclr.temperature: 0.1 -> 0.5" in msg
    assert "log_every_steps" not in msg  # cadence: safe for every job
    assert "--allow_config_change" in msg
    config_base.check_resume(new, run_dir, job, allow_change=True)


def test_safe_keys_are_per_job(tmp_path):
    # Pretraining reruns its end-of-run evaluation in full; a downstream run's eval.knn_k
    # is part of what it reports.
    changed = _config(eval={"knn_k": 20})
    for job, refused in (("pretrain", False), ("linear_eval", True), ("finetune", True)):
        run_dir = str(tmp_path / job)
        _save(run_dir, _saved(config_base.base_config()), job=job)
        if refused:
            with pytest.raises(ValueError, match="eval.knn_k: 200 -> 20"):
                config_base.check_resume(changed, run_dir, job, allow_change=False)
        else:
            config_base.check_resume(changed, run_dir, job, allow_change=False)
    for job in JOBS:
        assert resume.RESUME_SAFE_KEYS[job][: len(resume.COMMON_SAFE_KEYS)] == (
            resume.COMMON_SAFE_KEYS
        )
    with pytest.raises(ValueError, match=r"job='eval' is not one of \['distill', 'finetune'"):
        config_base.check_resume(changed, str(tmp_path / "x"), "eval", allow_change=True)


def test_an_old_pretraining_run_with_the_old_keys_resumes(tmp_path):
    """A config.json from before SimCLR's keys moved into config.simclr, no job.json."""
    saved = _saved(_config(simclr={"temperature": 0.3}))
    old = saved.pop("simclr")
    saved["temperature"] = old["temperature"]
    saved["loss"] = {"impl": "dense", "chunk_size": 1024, "decoupled": False}
    run_dir = str(tmp_path / "run")
    _save(run_dir, saved, checkpoints=True)
    config_base.check_resume(_config(simclr={"temperature": 0.3}), run_dir, "pretrain", False)
    with pytest.raises(ValueError, match=r"simclr.loss_impl: 'dense' -> 'blockwise'"):
        new = _config(simclr={"temperature": 0.3, "loss_impl": "blockwise"})
        config_base.check_resume(new, run_dir, "pretrain", False)
    assert config_base.config_diff(saved, _saved(_config(simclr={"temperature": 0.5}))) == [
        "simclr.temperature: 0.3 -> 0.5"
    ]


# --- record_run ----------------------------------------------------------------------------------


def test_record_run_writes_the_job_and_config_and_keeps_the_old_config(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    config = config_base.base_config()
    config_base.record_run(config, run_dir, "linear_eval")
    assert json.load(open(os.path.join(run_dir, "job.json"))) == {"job": "linear_eval"}
    text = open(os.path.join(run_dir, "config.json")).read()
    assert json.loads(text) == _saved(config)
    config_base.check_resume(config, run_dir, "linear_eval", allow_change=False)
    with pytest.raises(ValueError, match="holds a linear_eval run"):
        config_base.check_resume(config, run_dir, "pretrain", allow_change=False)

    config_base.record_run(config, run_dir, "linear_eval")  # the same config: nothing kept aside
    assert sorted(os.listdir(run_dir)) == ["config.json", "job.json"]
    monkeypatch.setattr(config_base.time, "time", lambda: 1234.5)
    config_base.record_run(_config(seed=3), run_dir, "linear_eval")
    assert sorted(os.listdir(run_dir)) == ["config.1234.json", "config.json", "job.json"]
    assert open(os.path.join(run_dir, "config.1234.json")).read() == text
    assert json.load(open(os.path.join(run_dir, "config.json")))["seed"] == 3


def test_record_run_writes_nothing_on_other_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(config_base.jax, "process_index", lambda: 1)
    config_base.record_run(config_base.base_config(), str(tmp_path / "run"), "pretrain")
    assert not os.path.exists(tmp_path / "run")
