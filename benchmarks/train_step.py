"""Images/sec, FLOPs, MFU and memory of the jitted SimCLR train step on synthetic data.

    python benchmarks/train_step.py --config=configs/digits.py --batch_size=256 --steps=10
    python benchmarks/train_step.py --preset=resnet50_224 --batch_size=256 --dtype=bfloat16
    python benchmarks/train_step.py --preset=vit_b16_224 --batch_size=256 --dtype=bfloat16
    python benchmarks/train_step.py --config=configs/digits.py --cpu_flags=both --with_input

Runs the real `pretrain.state.compile_train_step` (augmentation on device included unless
--no_augment) on random uint8 images placed on the devices, excludes compile time, and prints
one table row per run. Needs no TensorFlow and no dataset, except with --with_input, which also
runs the real input pipeline of the config's dataset in a loop and reports the share of
wall-clock the loop spent waiting for data. --cpu_flags=both runs the step with and without
simclr_jax's XLA:CPU flags (in two subprocesses: XLA reads its flags once per process).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Peak dense bf16 / fp32 FLOP/s per device kind (vendor figures), for MFU.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
}

PRESETS = {
    "resnet18_cifar32": dict(
        depth=18, stem="cifar", image_size=32, base_width=64, hidden=512, blur=0.0
    ),
    "resnet50_224": dict(
        depth=50, stem="imagenet", image_size=224, base_width=64, hidden=2048, blur=0.5
    ),
    # ViTs (config.model.name='vit'): ImageNet's S/16 and B/16, and CIFAR's S/4 (8 x 8 patches).
    "vit_s16_224": dict(variant="S/16", image_size=224, hidden=2048, blur=0.5),
    "vit_b16_224": dict(variant="B/16", image_size=224, hidden=2048, blur=0.5),
    "vit_s4_32": dict(variant="S/4", image_size=32, hidden=512, blur=0.0),
}


def load_config(args: argparse.Namespace) -> Any:
    """Config from --config file or --preset, with the command-line overrides applied."""
    if args.config:
        # A relative path is the repository's (configs/digits.py) from any working directory.
        path = args.config if os.path.exists(args.config) else os.path.join(REPO, args.config)
        spec = importlib.util.spec_from_file_location("cfg", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config()
    else:
        from simclr_jax.config_base import base_config

        p = PRESETS[args.preset]
        c = base_config()
        if "variant" in p:
            c.model.name, c.model.variant = "vit", p["variant"]
        else:
            c.model.depth, c.model.stem = p["depth"], p["stem"]
            c.model.base_width = p["base_width"]
        c.model.head_hidden_dim = p["hidden"]
        c.data.image_size = c.augment.image_size = p["image_size"]
        c.augment.blur_prob = p["blur"]
    if args.image_size:
        c.data.image_size = c.augment.image_size = args.image_size
    if args.base_width:
        c.model.base_width = args.base_width
    if getattr(args, "variant", ""):  # a ViT of this size instead (tests: 'mu/4')
        c.model.name, c.model.variant = "vit", args.variant
    if getattr(args, "method", ""):
        c.method = args.method
    c.batch_size = args.batch_size
    c.model.dtype = args.dtype or c.model.dtype
    c.total_steps = getattr(args, "total_steps", 1000)
    return c


def compare(args, flag: str, values: list[int]) -> None:
    """Compiles the step for each value of `--<flag>`, alternates them round by round (so all
    see the same machine load) for `--rounds` rounds and prints median wall and CPU ms/step."""
    import jax
    import numpy as np

    runs = []
    for v in values:
        setattr(args, flag, v)
        t0 = time.perf_counter()
        compiled, state, batch = build(args)
        state, m = compiled(state, batch)  # warm-up
        jax.block_until_ready(m)
        runs.append([v, compiled, state, batch, [], [], time.perf_counter() - t0])
    for _ in range(args.rounds):
        for r in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                r[2], m = r[1](r[2], r[3])
            jax.block_until_ready((r[2], m))
            r[4].append((time.perf_counter() - t0) / args.steps)
            r[5].append((time.process_time() - c0) / args.steps)
    base_wall, base_cpu = float(np.median(runs[0][4])), float(np.median(runs[0][5]))
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"| {flag} | ms/step | ratio | CPU ms/step | CPU ratio | build + warm-up s |")
    print("|---|---|---|---|---|---|")
    for v, *_, wall, cpu, build_s in runs:
        w, c = float(np.median(wall)), float(np.median(cpu))
        print(
            f"| {v} | {1e3 * w:.0f} | {w / base_wall:.2f} | {1e3 * c:.0f} | {c / base_cpu:.2f} "
            f"| {build_s:.1f} |"
        )


def model_label(m: Any) -> str:
    """'R50/64' for a ResNet (depth / stem width), 'ViT-B/16' for a ViT."""
    if m.get("name", "resnet") == "vit":
        return f"ViT-{m.variant}"
    return f"R{m.depth}/{m.base_width * m.width_multiplier}"


def peak_flops(device, dtype: str) -> float | None:
    """The device kind's peak FLOP/s from PEAK_FLOPS, or None when unknown (CPU)."""
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peaks[dtype]
    return None


def build(args) -> tuple[Any, Any, Any]:
    """The compiled step, its state and a synthetic batch on the devices, for `args`.

    `run` reads the config, mesh and compile time from `build.last`.
    """
    import jax
    import numpy as np

    from simclr_jax.pretrain import state as pretrain_state
    from simclr_jax.runtime import cpu_conv, parallel

    config = load_config(args)
    if getattr(args, "im2col_max_pixels", -1) >= 0:
        cpu_conv.IM2COL_MAX_PIXELS = args.im2col_max_pixels
    chunk = getattr(args, "kernel_grad_chunk_elements", -1)
    if chunk >= 0:  # 0: never chunk
        cpu_conv.KERNEL_GRAD_CHUNK_ELEMENTS = chunk or sys.maxsize
    mesh = parallel.make_mesh()
    model, tx, schedule = pretrain_state.model_and_optimizer(
        config, num_classes=10, steps_per_epoch=getattr(args, "steps_per_epoch", 100)
    )
    state = pretrain_state.create_train_state(config, model, tx, mesh)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    side = args.host_size or size
    batch = {
        "image": rng.integers(0, 256, (config.batch_size, side, side, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, (config.batch_size,), dtype=np.int32),
    }
    if args.host_size:  # the union of two windows from the host; the device cuts the views
        batch["crop"] = random_boxes(rng, config.batch_size, side)
    if args.no_augment:
        config.augment.crop = False
        config.augment.color_jitter_prob = config.augment.grayscale_prob = 0.0
        config.augment.blur_prob = 0.0
        config.augment.flip = False
    batch = jax.device_put(batch, parallel.data_sharded(mesh))
    step = pretrain_state.compile_train_step(config, model, tx, schedule, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    build.last = {"config": config, "mesh": mesh, "compile_s": time.perf_counter() - t0}
    return compiled, state, batch


def run(args) -> dict:
    """Compiles and times the step; returns the table row."""
    import jax

    compiled, state, batch = build(args)
    config, mesh, compile_s = (build.last[k] for k in ("config", "mesh", "compile_s"))
    size = config.data.image_size
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()

    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / args.steps
    if args.profile_dir:
        ops, state = profile_top_ops(compiled, state, batch, args.profile_dir)
        print_top_ops(ops)
    wait_share = float("nan")
    if args.with_input:
        wait_share = input_wait_share(config, compiled, state, mesh, args.steps)
    n_dev = jax.device_count()
    dev = jax.devices()[0]
    peak = peak_flops(dev, config.model.dtype)
    stats = dev.memory_stats() or {}
    row = {
        "device": f"{n_dev}x {dev.device_kind}",
        "model": model_label(config.model),
        "px": size,
        "batch": config.batch_size,
        "dtype": config.model.dtype,
        "aug": ("off" if args.no_augment else "on")
        + (f", host_size={args.host_size}" if args.host_size else ""),
        "step_s": dt,
        "img_per_s": config.batch_size / dt,
        "gflop_per_img": flops / config.batch_size / 1e9 if flops else float("nan"),
        "mfu": (flops / n_dev / dt / peak) if (flops and peak) else float("nan"),
        "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 2**30
        if stats
        else (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
        / 2**30,
        "compile_s": compile_s,
        "data_wait": wait_share,
        "xla_cpu_flags": "on" if "ynn" in os.environ.get("XLA_FLAGS", "") else "off",
    }
    return row


def random_boxes(rng: Any, batch_size: int, side: int) -> Any:
    """Two crop boxes per image in a `side`-px union: float32 [batch_size, 2, 4] (y, x, h, w)."""
    import numpy as np

    extent = rng.uniform(0.3 * side, side, (batch_size, 2, 2))
    begin = rng.uniform(0, 1, extent.shape) * (side - extent)
    return np.concatenate([begin, extent], -1).astype(np.float32)


def profile_top_ops(
    compiled: Any, state: Any, batch: Any, log_dir: str, steps: int = 3, top: int = 15
) -> tuple[list[tuple[str, float, int]], Any]:
    """Traces `steps` steps into `log_dir`; returns the `top` ops (name, share, calls), the state.

    The trace (TensorBoard's profile plugin or xprof read `log_dir`; ui.perfetto.dev reads its
    `perfetto_trace.json.gz`) stays for a closer look; the shares are summed from the Perfetto
    file over the device's "XLA Ops" line (on CPU, the threads that run XLA's kernels).
    """
    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {
        (e["pid"], e["tid"]): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    # GPU/TPU: the device's "XLA Ops" line (one event per op; the module and step lines would
    # count the same time again). CPU: the threads that run XLA's kernels.
    chosen = {key for key, name in threads.items() if name == "XLA Ops"}
    if not chosen:
        chosen = {key for key, name in threads.items() if "XLAEigen" in name or "PjRtCpu" in name}
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") != "X" or (chosen and (e.get("pid"), e.get("tid")) not in chosen):
            continue
        name = e.get("name", "?")
        if name.startswith(("ThunkExecutor", "$", "Pjit", "PjRt")):  # wrappers around the ops
            continue
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += float(e.get("dur", 0.0))
        entry[1] += 1
    whole = sum(v[0] for v in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    # The step donates its state: the caller must go on with the one returned here.
    return [(name, dur / whole, int(calls)) for name, (dur, calls) in ranked], state


def print_top_ops(ops: list[tuple[str, float, int]]) -> None:
    """Prints the profile's top ops as a Markdown table."""
    print("| op | share of traced time | calls |")
    print("|---|---|---|")
    for name, share, calls in ops:
        print(f"| `{name[:80]}` | {100 * share:.1f}% | {calls} |")
    print()


def input_wait_share(config, step_fn, state, mesh, steps: int) -> float:
    """Share of a real loop's wall-clock spent getting the next batch from the host pipeline."""
    import jax

    from simclr_jax import data
    from simclr_jax.runtime import parallel

    it = data.pretrain_iterator(config)
    nxt = parallel.host_to_global(next(it), mesh)
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, nxt)
        # As in train._batches: the next batch is fetched and placed while the step runs.
        tw = time.perf_counter()
        nxt = parallel.host_to_global(next(it), mesh)
        waited += time.perf_counter() - tw
    jax.block_until_ready((state, m))
    return waited / (time.perf_counter() - t0)


def print_table(rows: list[dict]) -> None:
    """Prints rows as a Markdown table."""
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="")
    p.add_argument("--preset", default="resnet18_cifar32", choices=sorted(PRESETS))
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=0)
    p.add_argument("--base_width", type=int, default=0)
    p.add_argument("--variant", default="", help="a ViT variant instead ('S/16', 'mu/4')")
    p.add_argument("--method", default="", help="a registered method (default: the config's)")
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10)
    # The run the step is compiled for (its LR schedule's constants; not its speed): with a run's
    # own values the program is the one that run compiles, and loads from its compile cache.
    p.add_argument("--total_steps", type=int, default=1000, help="the run's length")
    p.add_argument("--steps_per_epoch", type=int, default=100, help="the run's epoch in steps")
    p.add_argument("--no_augment", action="store_true")
    p.add_argument(
        "--im2col_max_pixels",
        type=int,
        default=-1,
        help="override cpu_conv.IM2COL_MAX_PIXELS (0: every conv via lax.conv; -1: the default)",
    )
    p.add_argument(
        "--host_size",
        type=int,
        default=0,
        help="feed H x H window unions plus crop boxes (config.data.host_size) instead of S x S",
    )
    p.add_argument(
        "--cpu_flags",
        default="on",
        choices=["on", "off", "both"],
        help="XLA:CPU flags of simclr_jax.platform_flags (CPU only)",
    )
    p.add_argument(
        "--kernel_grad_chunk_elements",
        type=int,
        default=-1,
        help="override cpu_conv.KERNEL_GRAD_CHUNK_ELEMENTS (0: no chunks; -1: the default)",
    )
    p.add_argument(
        "--compare_im2col",
        default="",
        help="e.g. 0,4: A/B these --im2col_max_pixels values in one process, alternated",
    )
    p.add_argument(
        "--compare_kernel_grad_chunks",
        default="",
        help="e.g. 0,262144: A/B these --kernel_grad_chunk_elements values, alternated",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of the --compare_* A/Bs")
    p.add_argument("--with_input", action="store_true")
    p.add_argument(
        "--profile_dir", default="", help="also trace 3 steps there and print the top ops"
    )
    p.add_argument("--json", action="store_true", help="print the row as JSON")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Parses flags, runs the benchmark, prints the table; returns its rows (none for A/Bs)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.cpu_flags == "both":
        rows = []
        for setting in ("off", "on"):
            rest = [a for a in argv if not a.startswith("--cpu_flags")]
            out = subprocess.run(
                [sys.executable, __file__, *rest, f"--cpu_flags={setting}", "--json"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        print_table(rows)
        return rows
    if args.cpu_flags == "on":
        from simclr_jax.runtime import platform_flags

        platform_flags.set_cpu_flags()
    if args.compare_im2col:
        compare(args, "im2col_max_pixels", [int(v) for v in args.compare_im2col.split(",")])
        return []
    if args.compare_kernel_grad_chunks:
        values = [int(v) for v in args.compare_kernel_grad_chunks.split(",")]
        compare(args, "kernel_grad_chunk_elements", values)
        return []
    row = run(args)
    print(json.dumps(row) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_table([row])
    return [row]


if __name__ == "__main__":
    main()
