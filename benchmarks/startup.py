"""A run's fixed costs on CPU: compiling the initialisation, and the first checkpoint saves.

    python benchmarks/startup.py                                   # the digits default
    python benchmarks/startup.py --image_size=8 --base_width=4     # the tests' tiny model

Every row runs in a fresh process with no compilation cache, on `--devices` (virtual CPU
devices for counts above 1), under the flags a run sets (`platform_flags.set_cpu_flags`):

- `init, jax.jit (-O3)`: the train state's initialiser compiled and run as plain `jax.jit` would;
- `init, jit_init (-O2)`: the same through `compiled.jit_init`, as runs compile it now;
- `init, eager`: `model.init` op by op, as the end-of-run evaluation drew its random-init encoder;
- `save, replica-parallel` / `save, one replica`: the first and second checkpoint saves of that
  state (orbax's default on CPU, which slices every replicated array per device, against
  `checkpoint.py`'s single-replica saves).

Prints a Markdown table of seconds per row and device count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KINDS = {
    "init_O3": "init, jax.jit (-O3)",
    "init_O2": "init, jit_init (-O2)",
    "init_eager": "init, eager",
    "save_replica_parallel": "save, replica-parallel",
    "save_one_replica": "save, one replica",
}


def _config(args: argparse.Namespace):
    from simclr_jax import config_base

    name = os.path.splitext(os.path.basename(args.config))[0]
    config = config_base.sibling_config(args.config, name)
    if args.image_size:
        config.data.image_size = config.augment.image_size = args.image_size
    if args.base_width:
        config.model.base_width = args.base_width
    return config


def child(args: argparse.Namespace) -> dict[str, float]:
    """One row in this process: seconds of each phase."""
    from simclr_jax.runtime import platform_flags

    platform_flags.set_cpu_flags()
    import jax

    from simclr_jax import checkpoint, data, models
    from simclr_jax.pretrain import state as pretrain_state
    from simclr_jax.runtime import compiled, parallel

    config = _config(args)
    model, tx, _ = pretrain_state.model_and_optimizer(
        config, data.dataset_info(config).num_classes, 10
    )
    size = config.augment.image_size
    mesh = parallel.make_mesh()

    def init():
        return models.init_variables(model, jax.random.fold_in(jax.random.key(0), 0), size)

    t = time.perf_counter()
    if args.child == "init_O3":
        jax.block_until_ready(jax.jit(init)())
    elif args.child == "init_O2":
        jax.block_until_ready(compiled.jit_init(init)())
    elif args.child == "init_eager":
        dummy = jax.numpy.zeros((2, size, size, 3))
        jax.block_until_ready(model.init(jax.random.key(0), dummy, train=False))
    else:
        state = jax.block_until_ready(pretrain_state.create_train_state(config, model, tx, mesh))
        one_replica = checkpoint._save_each_array_from_one_replica_on_cpu
        if args.child == "save_replica_parallel":
            checkpoint._save_each_array_from_one_replica_on_cpu = lambda: None  # orbax's default
        times = {}
        try:
            with tempfile.TemporaryDirectory() as workdir:
                manager = checkpoint.create_manager(workdir, keep=2)
                for step, name in ((1, "first"), (2, "second")):
                    t = time.perf_counter()
                    checkpoint.save(manager, step, state, {"step": step})
                    manager.wait_until_finished()
                    times[name] = time.perf_counter() - t
                manager.close()
        finally:  # a row run in the caller's process leaves checkpoint.py as it was
            checkpoint._save_each_array_from_one_replica_on_cpu = one_replica
        return times
    return {"first": time.perf_counter() - t}


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "digits.py"))
    p.add_argument("--devices", default="1,8", help="comma-separated device counts")
    p.add_argument("--image_size", type=int, default=0, help="override (0: the config's)")
    p.add_argument("--base_width", type=int, default=0, help="override (0: the config's)")
    p.add_argument("--rows", default=",".join(KINDS), help=f"comma-separated, of {list(KINDS)}")
    p.add_argument("--child", default="", choices=["", *KINDS], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Runs every row in its own process and prints the table; returns {row: times per count}."""
    p = parser()
    args = p.parse_args(argv)
    if args.child:  # one row's process (or a smoke run in the caller's process)
        times = child(args)
        print(json.dumps(times))
        return {args.child: [times]}
    kinds = [k for k in args.rows.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"--rows has unknown rows {unknown}; allowed: {', '.join(KINDS)}")
    counts = [int(n) for n in args.devices.split(",")]
    print(f"| row | {' | '.join(f'{n} device(s), s' for n in counts)} |")
    print(f"|---|{'---|' * len(counts)}")
    table = {}
    for kind in kinds:
        cells, table[kind] = [], []
        for n in counts:
            env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
            cmd = [sys.executable, __file__, f"--child={kind}", f"--config={args.config}"]
            cmd += [f"--image_size={args.image_size}", f"--base_width={args.base_width}"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:  # the child's own error, not only "exit status 1"
                raise SystemExit(f"{kind} on {n} device(s) failed:\n{out.stderr[-3000:]}")
            times = json.loads(out.stdout.strip().splitlines()[-1])
            table[kind].append(times)
            cells.append(" / ".join(f"{v:.2f}" for v in times.values()))
        print(f"| {KINDS[kind]} | {' | '.join(cells)} |", flush=True)
    return table


if __name__ == "__main__":
    main()
