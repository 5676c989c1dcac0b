"""Downstream speed and memory: linear-eval / fine-tune step images/s, and peak host RSS.

    python benchmarks/downstream.py step --config=configs/digits.py --batch_size=256
    python benchmarks/downstream.py step --depth=50 --image_size=224 --batch_size=128
    python benchmarks/downstream.py rss --images=600,2400 --jpeg_size=128

`step` times the real jitted `evals.classifier.classifier_train_step` (device crop + flip,
frozen encoder for linear evaluation, the whole network for fine-tuning) on random uint8 images
already on the devices, compile excluded; no TensorFlow, no dataset. `rss` writes image folders
of N JPEGs, runs `--mode=linear_eval` on each in a fresh process and reports its peak RSS: flat
in N, since the labelled splits are streamed.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(args: argparse.Namespace) -> Any:
    """The run config: --config (default the digits one) with the size flags applied."""
    from simclr_jax import config_base

    config = config_base.sibling_config(os.path.join(REPO, "configs", "x.py"), "digits")
    if args.config:
        import importlib.util

        # A relative path is the repository's (configs/digits.py) from any working directory.
        path = args.config if os.path.exists(args.config) else os.path.join(REPO, args.config)
        spec = importlib.util.spec_from_file_location("bench_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    if args.depth:
        config.model.depth = args.depth
        config.model.stem = "imagenet" if args.image_size >= 64 else "cifar"
        config.model.base_width = 64
    if args.image_size:
        config.data.image_size = config.augment.image_size = args.image_size
    if args.base_width:
        config.model.base_width = args.base_width
    config.model.dtype = args.dtype
    return config


def step(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Times each --jobs job's train step; prints and returns one row per job."""
    import jax
    import numpy as np

    from simclr_jax.evals import classifier as downstream
    from simclr_jax.runtime import compiled, parallel

    config = _config(args)
    mesh = parallel.make_mesh()
    rep, size = parallel.replicated(mesh), config.augment.image_size
    rng = np.random.default_rng(0)
    print(f"| job | model | image | batch | devices | images/s | ms/step |\n|{'---|' * 7}")
    rows = []
    for job in args.jobs.split(","):
        model = downstream.build_classifier(config.model, 0, 1000, freeze=job == "linear_eval")
        # Compiled as runs compile initialisers: an eager init compiles op by op (~20 s).
        dummy = np.zeros((2, size, size, 3), np.float32)
        init = compiled.jit_init(lambda m=model, x=dummy: m.init(jax.random.key(0), x, train=False))
        variables = jax.device_get(init())
        sec = config[job]
        freeze = job == "linear_eval"
        trainable = {
            k: v for k, v in variables["params"].items() if k == "classifier" or not freeze
        }
        frozen = {
            "params": {k: v for k, v in variables["params"].items() if k not in trainable},
            "batch_stats": variables["batch_stats"] if freeze else {},
        }
        stats = {} if freeze else variables["batch_stats"]
        tx, schedule = downstream.make_optimizer(sec, trainable, args.batch_size, 1000, 100, 1e-3)
        state = jax.device_put(
            downstream.ClassifierState(
                np.zeros((), np.int32), trainable, stats, tx.init(trainable)
            ),
            rep,
        )
        fn = jax.jit(
            functools.partial(
                downstream.classifier_train_step,
                model=model,
                tx=tx,
                schedule=schedule,
                aug_cfg=downstream.train_augment_config(config, True),
                seed=0,
            ),
            in_shardings=(rep, rep, parallel.data_sharded(mesh)),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        )
        frozen = jax.device_put(frozen, rep)
        batch = parallel.host_to_global(
            {
                "image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
                "label": rng.integers(0, 1000, (args.batch_size,)).astype(np.int32),
            },
            mesh,
        )
        state, m = fn(state, frozen, batch)  # compile
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = fn(state, frozen, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / args.steps
        name = f"ResNet-{config.model.depth} w{config.model.base_width} {config.model.dtype}"
        print(
            f"| {job} | {name} | {size} | {args.batch_size} | {mesh.devices.size} | "
            f"{args.batch_size / dt:.0f} | {1000 * dt:.1f} |",
            flush=True,
        )
        rows.append({"job": job, "images_per_s": args.batch_size / dt, "loss": float(m["loss"])})
    return rows


def _folder(root: str, n: int, side: int) -> None:
    """Writes n random JPEGs of side x side px into root/c<label>/, ten classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    for i in range(n):
        c = i % 10
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"c{c}", f"{i}.jpg"), quality=90)


def rss(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak RSS of --mode=linear_eval per folder size; prints and returns one row per size."""
    import jax

    from simclr_jax import checkpoint, models
    from simclr_jax.runtime import compiled

    counts = [int(x) for x in args.images.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(args)
        config.model.base_width = args.base_width or 8
        model = models.create_model(config, 10)
        size = config.augment.image_size
        key = jax.random.key(0)
        variables = jax.device_get(
            compiled.jit_init(lambda: models.init_variables(model, key, size))()
        )
        keep = {c: {k: variables[c][k] for k in ("encoder", "head")} for c in variables}
        model_config = {**config.model.to_dict(), "head_out_scale": True}
        export = checkpoint.export_encoder(
            os.path.join(tmp, "export"), keep, model_config, {"benchmark": True}
        )
        print(f"| JPEGs ({args.jpeg_size} px) | peak RSS of --mode=linear_eval (MiB) | wall s |")
        print("|---|---|---|")
        for n in counts:
            root = os.path.join(tmp, f"folder{n}")
            _folder(root, n, args.jpeg_size)
            flags = [
                f"--config={REPO}/configs/digits.py",
                "--mode=linear_eval",
                "--config.dataset=image_folder",
                f"--config.data.folder={root}",
                f"--config.data.image_size={size}",
                f"--config.augment.image_size={size}",
                f"--config.model.base_width={config.model.base_width}",
                f"--config.model.head_hidden_dim={config.model.head_hidden_dim}",
                f"--config.model.head_out_dim={config.model.head_out_dim}",
                f"--config.init_from={export}",
                "--config.linear_eval.epochs=1",
                "--config.linear_eval.batch_size=64",
                "--config.eval.batch_size=64",
                f"--workdir={os.path.join(tmp, f'run{n}')}",
            ]
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _MEASURED_MAIN, *flags],
                cwd=REPO,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": REPO},
            )
            if out.returncode:
                raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
            peak = int(out.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0])
            print(f"| {n} | {peak / 1024:.0f} | {time.perf_counter() - t:.0f} |", flush=True)
            rows.append({"images": n, "peak_mib": peak / 1024})
    return rows


# simclr_jax.main in the child, which reports its own peak RSS (ru_maxrss, KiB on Linux) at exit.
_MEASURED_MAIN = """
import resource, runpy, sys
sys.argv = ["simclr_jax.main", *sys.argv[1:]]
try:
    runpy.run_module("simclr_jax.main", run_name="__main__")
finally:
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _jobs(text: str) -> str:
    """Checks --jobs: a comma-separated list of linear_eval and finetune."""
    unknown = sorted(set(text.split(",")) - {"linear_eval", "finetune"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown jobs {unknown}: use linear_eval, finetune")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["step", "rss"])
    p.add_argument("--config", default="")
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--image_size", type=int, default=0)
    p.add_argument("--base_width", type=int, default=0, help="0: the config's (rss: 8)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--jobs",
        default="linear_eval,finetune",
        type=_jobs,
        help="step: comma-separated, of linear_eval and finetune",
    )
    p.add_argument("--images", default="600,2400")
    p.add_argument("--jpeg_size", type=int, default=128)
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parses flags, runs `step` or `rss`; returns the table's rows."""
    args = parser().parse_args(argv)
    return step(args) if args.what == "step" else rss(args)


if __name__ == "__main__":
    main()
