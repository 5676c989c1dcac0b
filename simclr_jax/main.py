"""The one command line: `python -m simclr_jax.main --config=configs/X.py --workdir=DIR`."""

from simclr_jax import platform_flags

platform_flags.set_cpu_flags()  # before JAX initialises its backend

import logging  # noqa: E402
import os  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = (
    "pretrain",
    "linear_eval",
    "finetune",
    "export",
    "export_torch",
    "report",
    "preview_augment",
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_enum("mode", "pretrain", MODES, "What to run.")
flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even if its saved config differs."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Dispatches to the mode's entry point; errors in user input exit with a clear message."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from simclr_jax import checkpoint, data, parallel, run_modes

    try:
        run_modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
    except (
        ValueError,
        FloatingPointError,
        data.DatasetNotAvailableError,
        checkpoint.CheckpointError,
        parallel.DistributedInitError,
    ) as e:
        # Our errors name the bad value and the fix; SIMCLR_DEBUG=1 shows the traceback too.
        if os.environ.get("SIMCLR_DEBUG") == "1":
            raise
        raise SystemExit(f"error: {e}") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for an unknown or mistyped config key."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}\nPass --helpshort for the flags.") from None
    except (AttributeError, KeyError, TypeError) as e:
        # ml_collections raises these for `--config.no_such_key=...` or a wrong value type.
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        raise SystemExit(f"error: bad --config override: {msg}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
