"""The digits default's train step in eager PyTorch next to the JAX one: ms/step and the ratio.

    python benchmarks/torch_step.py                 # both frameworks, alternating, 3 rounds
    python benchmarks/torch_step.py --rounds=5 --steps=3 --no_augment

PyTorch (dev extras only; imported here and nowhere else) runs the same network and batch as
`--config` (its view side, base width and head; `--image_size` and `--base_width` shrink both
frameworks alike), by default `configs/digits.py`: ResNet-18 layout with the CIFAR stem at base
width 16, 16 px, batch 256 (512 views), the 2-layer BN projection head (128 -> 64), the online
linear head on stop-gradient features, NT-Xent at temperature 0.2, eager fp32, AdamW, with a
cheap augmentation (random resized crop by `F.grid_sample` + brightness/contrast). JAX runs
the real `pretrain.state.compile_train_step` of the config (its optimizer and full augmentation
unless --no_augment), via `benchmarks/train_step.py`, with `platform_flags.set_cpu_flags()` as
`simclr_jax.main` runs it. Each round runs every framework in a fresh process of its own, one
after another (in one shared process PyTorch's spinning OpenMP threads slowed the JAX step by a
quarter), so all see about the same load: on a shared machine read the ratio, not the absolute
times. Prints a Markdown table `framework | ms/step | ratio`, with each round's times, the
process CPU time per step (all threads; less sensitive to other processes than wall-clock) and
the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def torch_step_fn(
    batch_size: int,
    size: int,
    width: int,
    augment: bool,
    threads: int,
    head: tuple[int, int] = (128, 64),
) -> Callable[[], float]:
    """Builds the PyTorch model, optimizer and data; returns a function running one step."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.down is None else self.down(x)))

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.stem = tnn.Sequential(
                tnn.Conv2d(3, w, 3, 1, 1, bias=False), tnn.BatchNorm2d(w), tnn.ReLU()
            )
            layers, cin = [], w
            for i in range(4):
                cout = w * 2**i
                layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
                cin = cout
            self.blocks = tnn.Sequential(*layers)
            hidden, out = head
            self.head = tnn.Sequential(
                tnn.Linear(cin, hidden, bias=False),
                tnn.BatchNorm1d(hidden),
                tnn.ReLU(),
                tnn.Linear(hidden, out, bias=False),
                tnn.BatchNorm1d(out, affine=False),
            )
            self.linear = tnn.Linear(cin, 10)

        def forward(self, x):
            h = self.blocks(self.stem(x)).mean((2, 3))
            return self.head(h), self.linear(h.detach())

    net = Net().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, (batch_size,)))

    def views(x):
        x = x.float().div(255).repeat(2, 1, 1, 1)
        n = x.shape[0]
        if not augment:
            return x.contiguous(memory_format=torch.channels_last)
        scale = torch.empty(n).uniform_(0.5, 1.0)  # side of the crop: area 0.25..1
        shift = (1 - scale)[:, None] * torch.empty(n, 2).uniform_(-1, 1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
        b = torch.empty(n, 1, 1, 1).uniform_(-0.4, 0.4)
        c = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean + b).clamp(0, 1)
        return x.contiguous(memory_format=torch.channels_last)

    def step():
        torch.set_num_threads(threads)  # global in PyTorch: each row sets its own
        z, logits = net(views(images))
        z = F.normalize(z, dim=1)
        n = z.shape[0] // 2
        sim = z @ z.t() / 0.2
        sim.fill_diagonal_(-1e9)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        loss = F.cross_entropy(sim, target) + F.cross_entropy(logits, labels.repeat(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _step_args(args: argparse.Namespace) -> argparse.Namespace:
    """train_step.py's flags for the config's step (as `train_step.load_config` reads them)."""
    return argparse.Namespace(
        config=args.config,
        preset="",
        image_size=args.image_size,
        base_width=args.base_width,
        batch_size=args.batch_size,
        total_steps=args.total_steps,
        steps_per_epoch=args.steps_per_epoch,
        dtype="",
        no_augment=args.no_augment,
        host_size=0,
        im2col_max_pixels=-1,
    )


def jax_step_fn(args: argparse.Namespace) -> Callable[[], None]:
    """Compiles the digits config's real train step; returns a function running one step."""
    import jax  # after platform_flags.set_cpu_flags() (in measure)
    import train_step

    step, state, batch = train_step.build(_step_args(args))
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)

    return run


def measure(args: argparse.Namespace) -> None:
    """Worker: builds one framework's step, warms it up, prints its per-step times as JSON."""
    if args.worker == "jax":
        from simclr_jax.runtime import platform_flags

        platform_flags.set_cpu_flags()
        fn = jax_step_fn(args)
    else:
        import train_step  # reads the config only: no TensorFlow, whose LLVM clashes with torch's

        # The same network and views as the JAX step's config (its sizes and head).
        c = train_step.load_config(_step_args(args))
        fn = torch_step_fn(
            args.batch_size,
            c.augment.image_size,
            c.model.base_width,
            not args.no_augment,
            int(args.worker),
            head=(c.model.head_hidden_dim, c.model.head_out_dim),
        )
    fn()  # warm-up (JAX compiled already; PyTorch's allocator and caches)
    fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        fn()
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    print(json.dumps({"wall": wall, "cpu": cpu}))


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.py")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=0, help="override (0: the config's)")
    p.add_argument("--base_width", type=int, default=0, help="override (0: the config's)")
    p.add_argument("--total_steps", type=int, default=1000, help="as train_step.py's")
    p.add_argument("--steps_per_epoch", type=int, default=100, help="as train_step.py's")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and framework")
    p.add_argument("--no_augment", action="store_true", help="both: feed the images unaugmented")
    p.add_argument(
        "--torch_threads",
        default="1,2",
        help="PyTorch intra-op thread counts, one row each (its OpenMP pool degrades badly when "
        "other processes load the cores); the ratio is to the fastest PyTorch row",
    )
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # 'jax' or a thread count
    return p


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Parses flags, alternates the frameworks' processes round by round, prints the table.

    Returns each row's per-round seconds per step (nothing in a `--worker` process).
    """
    args = parser().parse_args(argv)
    if args.worker:
        measure(args)
        return {}
    workers = {"jax": "jax"}
    for n in args.torch_threads.split(","):
        workers[f"pytorch ({n} thread{'s' if int(n) > 1 else ''})"] = n
    times: dict[str, list[float]] = {k: [] for k in workers}
    cpu: dict[str, list[float]] = {k: [] for k in workers}
    keys = (
        "config",
        "batch_size",
        "image_size",
        "base_width",
        "total_steps",
        "steps_per_epoch",
        "steps",
    )
    flags = [f"--{k}={getattr(args, k)}" for k in keys]
    flags += ["--no_augment"] if args.no_augment else []
    for _ in range(args.rounds):
        for name, worker in workers.items():
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--worker={worker}", *flags],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            times[name].append(row["wall"])
            cpu[name].append(row["cpu"])
    load = os.getloadavg()
    fastest = min((k for k in workers if k != "jax"), key=lambda k: float(np.median(times[k])))
    ref, ref_cpu = float(np.median(times[fastest])), float(np.median(cpu[fastest]))
    print(
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"augmentation {'off' if args.no_augment else 'on'}"
    )
    print("| framework | ms/step | ratio | rounds (ms) | CPU ms/step | CPU ratio |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, med_cpu = float(np.median(ts)), float(np.median(cpu[name]))
        rounds = ", ".join(f"{1e3 * t:.0f}" for t in ts)
        print(
            f"| {name} | {1e3 * med:.0f} | {med / ref:.2f} | {rounds} | {1e3 * med_cpu:.0f} "
            f"| {med_cpu / ref_cpu:.2f} |"
        )
    return times


if __name__ == "__main__":
    main()
