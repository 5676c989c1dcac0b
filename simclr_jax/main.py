"""The one command line: `python -m simclr_jax.main --config=configs/X.py --workdir=DIR`."""

from simclr_jax.runtime import platform_flags

platform_flags.set_cpu_flags()  # before JAX initialises its backend

import errno  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from simclr_jax.config import moved  # noqa: E402  (imports no JAX)
from simclr_jax.config.modes import MODE_NAMES  # noqa: E402  (imports no JAX)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/.", lock_config=True
)


class ConfigFileError(Exception):
    """A `--config` file that is missing or fails to load; the message is one line.

    Not a ValueError/TypeError on purpose: absl would rewrap those into a multi-line flag error.
    """


_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_CONFIG_ALLOWED = "a Python file whose get_config() returns an ml_collections.ConfigDict"


def _python_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [n for n in names if n.endswith(".py") and not n.startswith("_")]


def _available_configs(path: str) -> str:
    """Names the config files next to `path` (else the repository's configs/) for an error."""
    for directory in (path if os.path.isdir(path) else os.path.dirname(path) or ".", _CONFIGS_DIR):
        names = _python_files(directory)
        if names:
            if directory == ".":
                return "available: " + ", ".join(names)
            return "available: " + ", ".join(os.path.join(directory, n) for n in names)
    return f"pass {_CONFIG_ALLOWED}"


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _frames_in(e: BaseException, path: str) -> list[traceback.FrameSummary]:
    """The traceback frames of `e` in the file `path`, outermost first."""
    target = os.path.abspath(path)
    return [
        f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == target
    ]


def _where(e: BaseException, path: str) -> str:
    """`line N` of the config file where `e` was raised (the innermost frame in that file)."""
    if isinstance(e, SyntaxError):
        return ""  # its message already ends in "(file, line N)"
    frames = _frames_in(e, path)
    return f" (line {frames[-1].lineno})" if frames else ""


def _moved_key_in(e: BaseException, path: str) -> str | None:
    """The moved key a config file's failing line uses (`c.loss.impl = ...`), or None."""
    if not isinstance(e, AttributeError | KeyError):
        return None
    frames = _frames_in(e, path)
    return moved.moved_in_source(frames[-1].line or "") if frames else None


class _CheckedConfigFileParser(flags.ArgumentParser):
    """ml_collections' config-file parser, with every failure as one `ConfigFileError` line.

    Same semantics (`file.py[:arg]` -> `get_config(*arg)`, locked), but ml_collections defers a
    missing file to the first attribute access (an `_ErrorConfig` whose error surfaces as a
    traceback much later) and lets the config's own exceptions escape flag parsing with their
    traceback; here each one names the file, the error, and what is allowed.
    """

    def __init__(self, name: str, lock_config: bool = True):
        self.name = name
        self._lock_config = lock_config

    def flag_type(self) -> str:
        return "config object"

    def parse(self, path):
        path = str(path)
        file_path, *args = path.split(":", 1)  # `file.py:arg` passes `arg` to get_config
        prefix = f"--{self.name}={path}"
        if not file_path:
            raise ConfigFileError(f"--{self.name} is empty; {_available_configs('.')}")
        if not os.path.exists(file_path):
            raise ConfigFileError(f"{prefix}: no such file; {_available_configs(file_path)}")
        if os.path.isdir(file_path):
            raise ConfigFileError(
                f"{prefix}: is a directory, not a config file; {_available_configs(file_path)}"
            )
        if not os.path.isfile(file_path):
            raise ConfigFileError(f"{prefix}: not a regular file; pass {_CONFIG_ALLOWED}")
        debug = os.environ.get("SIMCLR_DEBUG") == "1"
        name = f"{self.name}_config"
        try:
            loader = importlib.machinery.SourceFileLoader(name, file_path)
            spec = importlib.util.spec_from_file_location(name, file_path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            loader.exec_module(module)
        except Exception as e:
            if debug:
                raise
            raise ConfigFileError(
                f"{prefix}: loading the file raised {_one_line(e)}{_where(e, file_path)}; "
                f"pass {_CONFIG_ALLOWED}"
            ) from None
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigFileError(
                f"{prefix}: the file defines no get_config(); pass {_CONFIG_ALLOWED} "
                f"(like {os.path.join(_CONFIGS_DIR, 'digits.py')})"
            )
        try:
            config = get_config(*args)
        except Exception as e:
            if debug:
                raise
            old = _moved_key_in(e, file_path)
            if old is not None:  # `c.loss.impl = ...`: the section is gone, name the new key
                raise ConfigFileError(
                    f"{prefix}: {moved.moved_message(old)}{_where(e, file_path)}"
                ) from None
            raise ConfigFileError(
                f"{prefix}: get_config() raised {_one_line(e)}{_where(e, file_path)}"
            ) from None
        if not isinstance(config, ml_collections.ConfigDict):
            raise ConfigFileError(
                f"{prefix}: get_config() returned {type(config).__name__}, "
                "not an ml_collections.ConfigDict (a missing return statement?)"
            )
        if self._lock_config:
            config.lock()
        return config


FLAGS["config"].parser = _CheckedConfigFileParser("config", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_enum("mode", "pretrain", MODE_NAMES, "What to run.")
flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even if its saved config differs."
)
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(workdir: str) -> None:
    """Refuses a `--workdir` that cannot hold a run, before anything is created or written.

    Allowed: an existing directory this process can write, or a path whose nearest existing
    ancestor is such a directory (the run creates the rest). Remote paths (`gs://...`) are left
    to the storage library. The check writes nothing in the workdir: writability is tested with
    `os.access` and a temporary directory made and removed at once in the nearest existing
    directory (root passes `os.access` on directories it still cannot write, e.g. under /proc).
    """
    allowed = "pass a new path or an existing directory you can write"
    if not workdir:
        raise SystemExit(f"error: --workdir is empty; {allowed}")
    if "://" in workdir:
        return
    prefix = f"error: --workdir={workdir}"
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise SystemExit(f"{prefix} is an existing file, not a directory; {allowed}")
    existing = os.path.abspath(workdir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"{prefix}: {existing} is a file, not a directory; {allowed}")
    try:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), existing)
        os.rmdir(tempfile.mkdtemp(prefix=".simclr_write_check_", dir=existing))
    except OSError as e:
        where = "" if existing == os.path.abspath(workdir) else f" (in {existing})"
        raise SystemExit(
            f"{prefix} cannot be written{where}: {e.strerror or e}; {allowed}"
        ) from None


def main(argv: list[str]) -> None:
    """Dispatches to the mode's entry point; errors in user input exit with a clear message."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_workdir(FLAGS.workdir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from simclr_jax import checkpoint, data, modes
    from simclr_jax.runtime import parallel, workdir_lock

    try:
        result = modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
    except (
        ValueError,
        FloatingPointError,
        data.DatasetNotAvailableError,
        checkpoint.CheckpointError,
        parallel.DistributedInitError,
        workdir_lock.WorkdirLockedError,
        OSError,  # e.g. a full disk while writing metrics: errno, reason and path in one line
    ) as e:
        # Our errors name the bad value and the fix; SIMCLR_DEBUG=1 shows the traceback too.
        if os.environ.get("SIMCLR_DEBUG") == "1":
            raise
        raise SystemExit(f"error: {e}") from None
    if isinstance(result, dict) and result.get("preempted"):
        # Saved and stopped on a preemption notice: a distinct status tells a scheduler or a
        # retry loop "resume me" apart from success (0) and errors (1).
        raise SystemExit(modes.PREEMPTED_EXIT_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for an unknown or mistyped config key."""
    old = moved.moved_in_args(argv[1:])
    if old is not None:  # `--config.temperature=...`: name the key's new place, not a typo
        raise SystemExit(f"error: {moved.moved_message(old)}")
    try:
        return FLAGS(argv)
    except ConfigFileError as e:
        raise SystemExit(f"error: {e}") from None
    except flags.Error as e:
        raise SystemExit(f"error: {e}\nPass --helpshort for the flags.") from None
    except (AttributeError, KeyError, TypeError) as e:
        # ml_collections raises these for `--config.no_such_key=...` or a wrong value type.
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        raise SystemExit(f"error: bad --config override: {msg}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
