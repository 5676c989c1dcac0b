"""The command line: bad input exits with one clear line, never a traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.batch_sise=1"], 'Did you mean "batch_size"'),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
        (["--config.simclr.temperature=-1"], "config.simclr.temperature=-1.0 is invalid: > 0"),
        (["--config.model.depth=19"], "config.model.depth=19 is invalid"),
        (["--mode=train"], "--mode=train"),
        (
            ["--config.dataset=cifar100", "--config.data.data_dir=/nonexistent"],
            "tfds build cifar100",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    proc = _run([f"--config={REPO}/configs/digits.py", f"--workdir={tmp_path / 'w'}", *args])
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def _run(args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "XLA_FLAGS": ""},
    )


def _snapshot(path):
    """Every file under `path` with its bytes, to prove a refused run changed nothing there."""
    return {
        os.path.relpath(os.path.join(root, name), path): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(path)
        for name in names
    }


def _assert_one_line_error(proc, *parts):
    """Exits non-zero with exactly one `error: ...` line on stderr that contains every part."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for part in parts:
        assert part in errors[0], proc.stderr


CONFIG_FILES = {
    "raises.py": "def get_config():\n    raise RuntimeError('the sky fell')\n",
    "bad_import.py": "import no_such_module_xyz\n\ndef get_config():\n    pass\n",
    "syntax.py": "def get_config(:\n",
    "no_get_config.py": "CONFIG = {}\n",
    "returns_none.py": "def get_config():\n    config = {}\n",
}


@pytest.mark.parametrize(
    "config,parts",
    [
        # A missing file lists the config files next to it (here the repository's configs/).
        ("configs/does_not_exist.py", ["no such file", "configs/digits.py", "configs/cifar10.py"]),
        ("configs", ["is a directory", "configs/digits.py"]),
        ("", ["--config is empty", "digits.py"]),
        # The config's own exception: the file, the exception and the line, in one line.
        ("{tmp}/raises.py", ["get_config() raised RuntimeError: the sky fell (line 2)"]),
        ("{tmp}/bad_import.py", ["ModuleNotFoundError", "no_such_module_xyz", "(line 1)"]),
        ("{tmp}/syntax.py", ["SyntaxError", "line 1", "get_config() returns"]),
        ("{tmp}/no_get_config.py", ["defines no get_config()", "ml_collections.ConfigDict"]),
        ("{tmp}/returns_none.py", ["returned NoneType", "ml_collections.ConfigDict"]),
    ],
)
def test_bad_config_file_is_one_clear_error(tmp_path, config, parts):
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _snapshot(workdir)
    config = config.format(tmp=tmp_path)
    proc = _run([f"--config={config}", f"--workdir={workdir}"], timeout=60)
    _assert_one_line_error(proc, f"--config={config}" if config else "--config", *parts)
    assert _snapshot(workdir) == before


def test_unknown_flag_suggests_the_right_one(tmp_path):
    proc = _run([f"--config={REPO}/configs/digits.py", f"--wrokdir={tmp_path}"], timeout=60)
    _assert_one_line_error(proc, "Unknown command line flag 'wrokdir'", "workdir")


@pytest.mark.parametrize(
    "workdir,parts",
    [
        ("{file}", ["is an existing file, not a directory"]),
        ("{file}/sub", ["is a file, not a directory"]),
        ("", ["--workdir is empty"]),
        # Unwritable even for root (the suite may run as root, where permission bits do not
        # stop writes): /proc/self refuses os.access(W_OK); /proc passes it but refuses mkdir,
        # so both ways of finding out are exercised.
        ("/proc/self/simclr_jax_test_w", ["cannot be written (in /proc/self)"]),
        ("/proc/simclr_jax_test_w", ["cannot be written (in /proc)"]),
    ],
)
def test_bad_workdir_is_one_clear_error_before_anything_is_written(tmp_path, workdir, parts):
    existing = tmp_path / "not_a_dir"
    existing.write_text("a file the user keeps\n")
    workdir = workdir.format(file=existing)
    proc = _run([f"--config={REPO}/configs/digits.py", f"--workdir={workdir}"], timeout=60)
    _assert_one_line_error(proc, f"--workdir={workdir}" if workdir else "--workdir", *parts)
    assert "you can write" in proc.stderr  # what is allowed
    assert existing.read_text() == "a file the user keeps\n"
    assert sorted(os.listdir(tmp_path)) == ["not_a_dir"]
    assert not os.path.exists(workdir) or workdir == str(existing)


def test_unwritable_existing_workdir_is_refused_and_kept(tmp_path):
    """A directory without write permission (as non-root; root writes through permission bits)."""
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits; the /proc cases cover root")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    workdir.chmod(0o500)
    try:
        proc = _run([f"--config={REPO}/configs/digits.py", f"--workdir={workdir}"], timeout=60)
    finally:
        workdir.chmod(0o700)
    _assert_one_line_error(proc, f"--workdir={workdir} cannot be written", "Permission denied")
    assert _snapshot(workdir) == {"config.json": b"{}"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.temperature=0.5"], "config.temperature moved to config.simclr.temperature"),
        (["--config.loss.impl=blockwise"], "config.loss.impl moved to config.simclr.loss_impl"),
        (["--config.loss.decoupled"], "config.loss.decoupled moved to config.simclr.decoupled"),
        (["--config.data.shuffle_buffer=10"], "config.data.shuffle_buffer was removed: streamed"),
    ],
)
def test_an_old_key_on_the_command_line_names_its_new_place(tmp_path, args, message):
    proc = _run([f"--config={REPO}/configs/digits.py", f"--workdir={tmp_path / 'w'}", *args])
    _assert_one_line_error(proc, message)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "line,message",
    [
        # Sets a dead key on the unlocked config: refused when the config is validated.
        ("c.temperature = 0.3", "config.temperature moved to config.simclr.temperature"),
        # The old section is gone: refused while the file loads, naming the line.
        ('c.loss.impl = "blockwise"', "config.loss.impl moved to config.simclr.loss_impl (line 6)"),
        ("c.data.shuffle_buffer = 50_000", "config.data.shuffle_buffer was removed: streamed"),
    ],
)
def test_an_old_key_in_a_config_file_names_its_new_place(tmp_path, line, message):
    config = tmp_path / "old.py"
    config.write_text(
        "from simclr_jax.config_base import sibling_config\n\n\n"
        "def get_config():\n"
        f"    c = sibling_config({str(REPO + '/configs/x.py')!r}, 'digits')\n"
        f"    {line}\n"
        "    return c\n"
    )
    proc = _run([f"--config={config}", f"--workdir={tmp_path / 'w'}"])
    _assert_one_line_error(proc, message)
    assert not (tmp_path / "w" / "checkpoints").exists()
