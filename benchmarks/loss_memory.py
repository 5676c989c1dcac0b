"""Peak memory and time of the dense vs blockwise NT-Xent (loss + gradients) by global batch.

    python benchmarks/loss_memory.py                       # 1k..16k examples (CPU default)
    python benchmarks/loss_memory.py --max_batch=65536     # 1k..64k, e.g. on one H100
    python benchmarks/loss_memory.py --chunk_size=4096 --dim=128 --max_batch=65536

Each row is one jitted `value_and_grad` of the loss over the devices' mesh (the train step's
`shard_map` around the gather), on random unit-norm projections `[B, dim]` per view: B examples,
2B views, 2B/devices anchor rows per device. Columns:
- `temp MiB`: XLA's compiled `memory_analysis().temp_size_in_bytes`, the scratch one device's
  program needs besides its inputs and outputs (known without running);
- `peak MiB`: the device's `memory_stats()['peak_bytes_in_use']` (GPU/TPU; '-' on CPU), measured
  in a fresh subprocess per row so that earlier rows do not raise it;
- `ms`: median wall time of a step after a warm-up call (compile excluded);
- `loss diff`, `grad diff`: |blockwise - dense| of the loss, and the largest gradient difference
  relative to the largest dense gradient entry (first `--compare_rows` rows), where both ran.
A row whose compiled temp exceeds `--max_run_gib` is compiled but not run ('skip'), so the table
shows the dense loss's quadratic growth without exhausting the machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 2**20


def _loss_fn(impl: str, chunk_size: int, temperature: float):
    from simclr_jax import losses, losses_blockwise

    if impl == "dense":
        return functools.partial(losses.nt_xent_with_metrics, temperature=temperature)
    return functools.partial(
        losses_blockwise.nt_xent_blockwise_with_metrics,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def measure(batch: int, impl: str, args: argparse.Namespace) -> dict:
    """One row: compile the sharded loss+grad for `batch` examples, then run it if it fits."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()[: args.devices or None]
    mesh = Mesh(np.asarray(devices), ("data",))
    sharded = jax.shard_map(
        functools.partial(_loss_fn(impl, args.chunk_size, args.temperature), axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=(P(), P()),
    )
    step = jax.jit(jax.value_and_grad(lambda a, b: sharded(a, b)[0], argnums=(0, 1)))
    spec = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32)
    compiled = step.lower(spec, spec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = {"batch": batch, "impl": impl, "devices": len(devices), "temp_bytes": int(temp)}
    if temp > args.max_run_gib * 2**30:
        return row
    k1, k2 = jax.random.split(jax.random.key(0))
    place = NamedSharding(mesh, P("data"))
    z1 = jax.device_put(jax.random.normal(k1, (batch, args.dim)), place)
    z2 = jax.device_put(z1 + 0.5 * jax.random.normal(k2, (batch, args.dim)), place)
    out = jax.block_until_ready(compiled(z1, z2))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(z1, z2))
        times.append(time.perf_counter() - t0)
    stats = devices[0].memory_stats() or {}
    row.update(
        ms=1e3 * float(np.median(times)),
        peak_bytes=stats.get("peak_bytes_in_use"),
        loss=float(out[0]),
    )
    if args.save_grads:
        np.save(args.save_grads, np.asarray(out[1][0][: args.compare_rows]))
    return row


def _run_isolated(batch: int, impl: str, args: argparse.Namespace, grads_path: str) -> dict:
    """`measure` in a fresh process, so that the device's peak memory is this row's alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_row", f"{batch},{impl}"]
    cmd += [f"--{k}={v}" for k, v in vars(args).items() if k not in ("_row", "save_grads")]
    cmd += [f"--save_grads={grads_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:]
        return {"batch": batch, "impl": impl, "error": tail[0][:120] if tail else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt_mib(x) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min_batch", type=int, default=1024, help="smallest global batch (examples)")
    p.add_argument("--max_batch", type=int, default=16384, help="largest global batch")
    p.add_argument("--dim", type=int, default=128, help="projection dimension")
    p.add_argument("--chunk_size", type=int, default=1024, help="blockwise candidate columns")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    p.add_argument("--max_run_gib", type=float, default=6.0, help="compile-only above this temp")
    p.add_argument("--impls", default="dense,blockwise")
    p.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="one subprocess per row (auto: where the device reports memory_stats)",
    )
    p.add_argument("--compare_rows", type=int, default=256, help="gradient rows compared")
    p.add_argument("--save_grads", default="", help=argparse.SUPPRESS)
    p.add_argument("--_row", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the Markdown table for global batches min_batch, 2*min_batch, ..., max_batch.

    Returns the rows measured (none in a `--_row` child, which prints its row as JSON).
    """
    args = parser().parse_args(argv)

    if args._row:  # child of --isolate: one row as JSON on the last line
        batch, impl = args._row.split(",")
        print(json.dumps(measure(int(batch), impl, args)))
        return []

    import tempfile

    import jax
    import numpy as np

    dev = jax.devices()[0]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and dev.memory_stats() is not None)
    n_dev = args.devices or jax.device_count()
    print(
        f"# {dev.device_kind} x {n_dev} ({dev.platform}), jax {jax.__version__}, "
        f"{platform.node()}, {datetime.date.today()}: dim {args.dim}, chunk {args.chunk_size}, "
        f"fp32, loss + grads"
    )
    print()
    print("| global batch | views | impl | temp MiB | peak MiB | ms | loss diff | grad diff |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    batch = args.min_batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        while batch <= args.max_batch:
            ref = None
            for impl in args.impls.split(","):
                path = os.path.join(tmp, f"{batch}-{impl}.npy")
                if isolate:
                    row = _run_isolated(batch, impl, args, path)
                else:
                    args.save_grads = path
                    row = measure(batch, impl, args)
                d_loss = d_grad = "-"
                if "loss" in row and impl == "dense":
                    ref = (row["loss"], np.load(path))
                elif "loss" in row and ref is not None:
                    d_loss = f"{abs(row['loss'] - ref[0]):.1e}"
                    diff = np.max(np.abs(np.load(path) - ref[1])) / np.max(np.abs(ref[1]))
                    d_grad = f"{float(diff):.1e}"
                if "error" in row:
                    ms = f"error: {row['error']}"
                else:
                    ms = f"{row['ms']:,.1f}" if "ms" in row else "skip"
                print(
                    f"| {batch:,} | {2 * batch:,} | {impl} | {_fmt_mib(row.get('temp_bytes'))} "
                    f"| {_fmt_mib(row.get('peak_bytes'))} | {ms} | {d_loss} | {d_grad} |",
                    flush=True,
                )
                rows.append({**row, "loss_diff": d_loss, "grad_diff": d_grad})
            batch *= 2
    return rows


if __name__ == "__main__":
    main()
