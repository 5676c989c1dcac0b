"""Every benchmarks/*.py script run once at its tiniest, so a renamed function fails a test.

Each test calls the script's `main(argv)` in this process (JAX already has the 8 CPU devices of
conftest.py) with one step or round at tests/tiny.py's sizes: 8 px, base width 4, batch 32.
Where a script's rows are processes of their own (digits_sweep.py, torch_step.py,
`downstream.py rss`) it starts them as it always does, at the same sizes; startup.py's rows are
fresh processes without the compile cache by design, so its test runs one row's body here. The
tests check that each script runs its real code path and returns sane rows, not its figures.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys
from types import ModuleType
from typing import Any

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCHMARKS, "*.py")))
DIGITS = os.path.join(REPO, "configs", "digits.py")
# tests/tiny.py's model: a ResNet-18 at base width 4 on 8 px views.
TINY = ["--image_size=8", "--base_width=4"]


def load(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (scripts that import a sibling put their folder on the
    path themselves, as when they run)."""
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", os.path.join(BENCHMARKS, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Undoes what a script does to this process, for the tests after it.

    Scripts call `platform_flags.set_cpu_flags()` as runs do (it appends to XLA_FLAGS, which
    subprocesses started later read, and turns off asynchronous dispatch), and put the repository
    and benchmarks/ on sys.path.
    """
    xla_flags = os.environ.get("XLA_FLAGS")
    async_dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
    path = list(sys.path)
    yield
    if xla_flags is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = xla_flags
    jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)
    sys.path[:] = path


def test_every_script_has_a_smoke_test_a_parser_and_a_main_taking_argv():
    tests = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    for script in SCRIPTS:
        assert any(t == script or t.startswith(f"{script}_") for t in tests), (
            f"benchmarks/{script}.py has no smoke test here (test_{script}...)"
        )
        tree = ast.parse(open(os.path.join(BENCHMARKS, f"{script}.py")).read())
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "parser" in functions, f"benchmarks/{script}.py has no parser()"
        main = functions.get("main")
        assert main and [a.arg for a in main.args.args] == ["argv"], f"{script}.py: main(argv)"


def test_augment():
    # The crop-box input: the plain one is the same program without the boxes.
    rows = load("augment").main(
        ["--image_size=8", "--batch_size=16", "--steps=1", "--host_size=12"]
    )
    assert [r["input"] for r in rows] == ["12 px + boxes"] and rows[0]["views_per_s"] > 0


def test_conv_grads():
    args = ["--batch=8", "--chunks=2", "--calls=1", "--rounds=1", "--convs=2"]
    rows = load("conv_grads").main(args)
    assert len(rows) == 2 and all(len(cells) == 5 for cells in rows)
    # The chunked kernel gradient's error against float64, relative to its largest element.
    errors = [float(re.search(r"\(([^)]+)\)", cells[-1]).group(1)) for cells in rows]
    assert max(errors) < 1e-5


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections' loader
def test_digits_sweep_dry_run_checks_every_recipe():
    sweep = load("digits_sweep")
    rows = sweep.main(["--dry_run", "--seeds=0,1"])
    assert [r["recipe"] for r in rows[:2]] == ["default_seed0", "default_seed1"]
    assert len(rows) == 2 * len(sweep.RECIPES)
    with pytest.raises(SystemExit, match="recipe default: bad override"):
        sweep.main(["--dry_run", "--recipes=default", "--extra=--config.no_such_key=1"])


# One pretraining step of tests/tiny.py's model without augmentation (as train_step.py's
# --no_augment; augment.py has its own test), then the end-of-run evaluation.
TINY_RUN = [
    "--config.total_steps=1",
    "--config.batch_size=32",
    "--config.data.image_size=8",
    "--config.augment.image_size=8",
    "--config.model.base_width=4",
    "--config.augment.crop=False",
    "--config.augment.color_jitter_prob=0.0",
    "--config.eval.batch_size=256",
    "--config.eval.linear_epochs=1",
]
# train_step.py's flags for the step that run compiles (1437 training digits: 44 steps of 32),
# which its process left in the session's compile cache (conftest.py) for train_step.py and
# torch_step.py to load instead of compiling it again.
RUN_STEP = [f"--config={DIGITS}", *TINY, "--batch_size=32", "--no_augment"]
RUN_STEP += ["--total_steps=1", "--steps_per_epoch=44"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> dict[str, Any]:
    """One real digits_sweep.py run of the default recipe, one tiny step; its workdir is kept."""
    root = tmp_path_factory.mktemp("sweep")
    extra = [f"--extra={flag}" for flag in TINY_RUN]
    rows = load("digits_sweep").main(["--recipes=default", f"--workdir_root={root}", *extra])
    assert len(rows) == 1 and "error" not in rows[0], rows
    return rows[0]


def test_digits_sweep(sweep_run):
    for key in ("linear", "linear_random", "knn", "knn_random"):
        assert 0.0 <= sweep_run[key] <= 1.0, key
    assert os.path.isfile(os.path.join(sweep_run["workdir"], "eval.json"))


def test_probe_check(sweep_run):
    rows = load("probe_check").main([sweep_run["workdir"], "--cs=1", "--folds=2"])
    assert [r["encoder"] for r in rows] == ["random_init", "pretrained"]
    for row in rows:
        # The end-of-run probe on the same banks reproduces the run's eval.json.
        assert row["probe"] == pytest.approx(row["eval_json"], abs=1e-6)
        assert 0.0 <= row["lr_test"] <= 1.0


def test_train_step(sweep_run, tmp_path):
    # sweep_run: its run compiled this very step (see RUN_STEP).
    (row,) = load("train_step").main([*RUN_STEP, "--steps=1", f"--profile_dir={tmp_path}"])
    assert row["px"] == 8 and row["img_per_s"] > 0 and row["xla_cpu_flags"] == "on"


def test_train_step_vit_presets():
    """The ViT presets build the configs they name; one step of a tiny ViT at 8 px runs."""
    step = load("train_step")
    from simclr_jax import config_base

    for preset, variant, size in [
        ("vit_s16_224", "S/16", 224),
        ("vit_b16_224", "B/16", 224),
        ("vit_s4_32", "S/4", 32),
    ]:
        c = step.load_config(step.parser().parse_args([f"--preset={preset}"]))
        assert (c.model.name, c.model.variant, c.augment.image_size) == ("vit", variant, size)
        config_base.validate_config(c)
    args = ["--preset=vit_s4_32", "--variant=mu/4", "--image_size=8", "--batch_size=16"]
    (row,) = step.main([*args, "--no_augment", "--steps=1", "--total_steps=1"])
    assert row["model"] == "ViT-mu/4" and row["px"] == 8 and row["img_per_s"] > 0


def test_torch_step(sweep_run):
    pytest.importorskip("torch")
    args = [a for a in RUN_STEP if not a.startswith("--config=")]  # its default: digits
    times = load("torch_step").main([*args, "--rounds=1", "--steps=1", "--torch_threads=1"])
    assert list(times) == ["jax", "pytorch (1 thread)"]
    assert all(len(t) == 1 and t[0] > 0 for t in times.values())


def test_downstream_step():
    # The linear-eval job: fine-tuning's differs in what it trains, and compiles about 3x longer.
    args = ["step", f"--config={DIGITS}", *TINY, "--batch_size=16", "--steps=1"]
    rows = load("downstream").main([*args, "--jobs=linear_eval"])
    assert [r["job"] for r in rows] == ["linear_eval"]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)


def test_downstream_rss():
    rows = load("downstream").main(["rss", "--images=50", "--jpeg_size=16", *TINY])
    assert [r["images"] for r in rows] == [50] and rows[0]["peak_mib"] > 0


def test_host_size_resolution():
    rows = load("host_size_resolution").main(["--samples=16", "--host_size=256", "--size=224"])
    assert len(rows) == 2 and all(0.0 < mean <= 1.0 for *_, mean in rows)


def test_input_pipeline(tmp_path):
    args = [
        "--num_images=16",
        "--batch_size=8",
        "--threads=1",
        "--warmup=0",
        "--steps=1",
        "--repeats=1",
        "--jpeg_size=64x48",
        f"--folder={tmp_path}",
        "--memory_examples=64",
        "--idle_timeout_s=1",
    ]
    rows = load("input_pipeline").main(args)
    assert [r["path"] for r in rows] == [
        "image_folder host_size=256",
        "image_folder host_size=256 old tf.data",
        "imagenet2012 ArrayRecord host_size=256",
        "imagenet2012 TFRecord host_size=256 old tf.data",
        "image_folder host_size=0",
        "baseline decode_and_crop",
        "cifar10 in-memory 32px",
        "digits in-memory 16px",
    ]
    assert all(r["images/s"] > 0 for r in rows)
    assert float(rows[0]["of old"]) > 0 and float(rows[2]["of old"]) > 0


def test_resume(tmp_path):
    args = ["--num_images=16", "--batch_size=8", "--threads=1", "--repeats=1"]
    args += ["--jpeg_size=64x48", f"--folder={tmp_path}", "--steps=0,1000000", "--old_steps=0,2"]
    rows = load("resume").main(args)
    assert [(r["source"], r["pipeline"]) for r in rows] == [
        ("image_folder", "new (Grain)"),
        ("image_folder", "old (tf.data skip)"),
        ("imagenet2012 ArrayRecord", "new (Grain)"),
        ("imagenet2012 TFRecord", "old (tf.data skip)"),
    ]
    assert all(r["step 0"] > 0 for r in rows) and rows[0]["step 1,000,000"] > 0


def test_loss_memory():
    args = ["--min_batch=64", "--max_batch=64", "--dim=8", "--chunk_size=32", "--repeats=1"]
    rows = load("loss_memory").main([*args, "--compare_rows=8"])
    assert [r["impl"] for r in rows] == ["dense", "blockwise"]
    assert float(rows[1]["grad_diff"]) < 1e-4 and float(rows[1]["loss_diff"]) < 1e-4


def test_reduction_error():
    rows = load("reduction_error").main(["--batch=8"])
    assert len(rows) == 5 and all(e1 < 1e-5 and e2 < 1e-5 for _, e1, e2 in rows)


def test_startup():
    # One row's process body, here: each row is a fresh process with no compile cache by design
    # (~15 s). This row builds the train state (as the init rows do) and saves it twice.
    table = load("startup").main(["--child=save_one_replica", *TINY])
    assert list(table) == ["save_one_replica"]
    assert list(table["save_one_replica"][0]) == ["first", "second"]


def _gpu_check_commands() -> list[list[str]]:
    """The python command of each `check` line of gpu_checks.sh, its variables substituted."""
    text = open(os.path.join(BENCHMARKS, "gpu_checks.sh")).read().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(\S+)$", text, re.M))
    commands = []
    for line in text.splitlines():
        if line.startswith("check "):
            words = shlex.split(line)[2:]  # after `check LIMIT_S`
            words = [re.sub(r"\$(\w+)", lambda m: variables.get(m[1], "OUT"), w) for w in words]
            commands.append(words)
    return commands


def test_gpu_checks_parses_and_every_command_takes_its_flags():
    script = os.path.join(BENCHMARKS, "gpu_checks.sh")
    subprocess.run(["bash", "-n", script], check=True)
    commands = _gpu_check_commands()
    assert len(commands) >= 8
    for words in commands:
        assert words[0] == "python3" and words[1].startswith("benchmarks/"), words
        name = os.path.basename(words[1])[:-3]
        load(name).parser().parse_args(words[2:])  # argparse exits on a flag it does not know
