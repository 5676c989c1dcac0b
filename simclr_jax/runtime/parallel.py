"""Device mesh, multi-host start-up, and placement of host batches as global arrays.

Multi-host runs use JAX's own multi-controller runtime: every process runs the same program,
`jax.distributed.initialize` connects them (auto-detected on TPU VMs and SLURM, explicit
`config.distributed.*` otherwise), and one mesh spans the devices of all processes. Each process
feeds only its own rows of every global batch (`host_to_global`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.experimental.multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# JAX's own initialisation deadline is set this much later than ours, so that our watchdog,
# which names the coordinator and the settings, fires before JAX aborts with DEADLINE_EXCEEDED.
_JAX_TIMEOUT_GRACE_S = 10

log = logging.getLogger(__name__)


class DistributedInitError(RuntimeError):
    """Processes of a multi-host run could not connect; the message names the coordinator."""


def _host_port(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6::addr]:port'."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DistributedInitError(
            f"config.distributed.coordinator_address={address!r} is not HOST:PORT"
        )
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Polls until a TCP connection to `address` succeeds; raises after `timeout` seconds.

    Used before `jax.distributed.initialize` on processes other than the coordinator: JAX itself
    aborts the whole process (a C++ fatal error, no Python exception) when it cannot connect.
    """
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout, 0.1))):
                return
        except OSError as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise DistributedInitError(
                f"cannot reach the JAX coordinator at {address} within "
                f"config.distributed.initialization_timeout={timeout:g} s ({last_error}). "
                "Start process 0 first (it hosts the coordinator), check the address and port, "
                "and that no firewall blocks it."
            )
        time.sleep(0.25)


def _timed_out(description: str) -> None:
    """Watchdog: report which start-up did not finish and end the process (exit status 1)."""
    print(
        f"error: jax.distributed.initialize did not complete within "
        f"config.distributed.initialization_timeout ({description}). Every process must be "
        "started with the same coordinator address and num_processes, and a distinct "
        "process_id in [0, num_processes).",
        file=sys.stderr,
        flush=True,
    )
    # The main thread is blocked inside JAX's C++ connect, which no Python exception can
    # interrupt; exiting here turns JAX's abort (SIGABRT) into a clear, bounded failure.
    os._exit(1)


def maybe_initialize_distributed(config: Any) -> None:
    """Starts JAX's multi-controller runtime when `config.distributed.enabled` (idempotent).

    Empty/zero/-1 fields are left to JAX's auto-detection (TPU VMs, SLURM). A coordinator that
    cannot be reached fails after `initialization_timeout` seconds with a message naming it
    (`DistributedInitError`), as does a process group that never completes.
    """
    dc = config.distributed
    if not dc.enabled or jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend to talk to each other; GPU/TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = float(dc.initialization_timeout)
    if timeout <= 0:
        raise DistributedInitError(
            f"config.distributed.initialization_timeout={dc.initialization_timeout!r} must be > 0"
        )
    deadline = time.monotonic() + timeout
    kwargs: dict[str, Any] = {}
    if dc.coordinator_address:
        kwargs["coordinator_address"] = dc.coordinator_address
    if dc.num_processes > 0:
        kwargs["num_processes"] = int(dc.num_processes)
    if dc.process_id >= 0:
        kwargs["process_id"] = int(dc.process_id)
    if dc.coordinator_address and dc.process_id > 0:
        # Process 0 hosts the coordinator; the others can check it answers before JAX tries.
        wait_for_coordinator(dc.coordinator_address, timeout)
    remaining = max(1, math.ceil(deadline - time.monotonic()))
    kwargs["initialization_timeout"] = remaining + _JAX_TIMEOUT_GRACE_S
    description = (
        f"{remaining} s left; coordinator {dc.coordinator_address or '<auto-detected>'}, "
        f"num_processes={kwargs.get('num_processes', '<auto>')}, "
        f"process_id={kwargs.get('process_id', '<auto>')}"
    )
    watchdog = threading.Timer(remaining, _timed_out, args=(description,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that failed
        raise DistributedInitError(
            f"jax.distributed.initialize failed with {kwargs}: {e}. Check that the coordinator "
            "address is reachable from every process and that every process was started."
        ) from e
    finally:
        watchdog.cancel()
    log.info(
        "process %d/%d: %d local of %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    if jax.process_index() != 0:
        # Every process runs the same loop; only process 0 reports progress (others warn/fail).
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (a no-op in a one-process run)."""
    if jax.process_count() > 1:
        jax.experimental.multihost_utils.sync_global_devices(name)


def gather_json(value: Any, max_bytes: int = 4096) -> list[Any]:
    """Every process's JSON-able `value`, in process order (one all-gather; all must call it).

    Sent as fixed-size UTF-8 JSON (`max_bytes` a process): exact integers of any size and text,
    which an all-gather of numbers (int32 without x64) would not carry.
    """
    if jax.process_count() == 1:
        return [value]
    text = json.dumps(value).encode()
    if len(text) > max_bytes:
        raise ValueError(f"gather_json: {len(text)} bytes of JSON, more than {max_bytes}")
    buffer = np.zeros(max_bytes, np.uint8)
    buffer[: len(text)] = np.frombuffer(text, np.uint8)
    rows = np.asarray(jax.experimental.multihost_utils.process_allgather(buffer))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in rows.reshape(-1, max_bytes)]


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """One-axis mesh ('data') over all devices of all processes (or the given devices).

    Devices are grouped by process, in process order, so process p holds rows
    `[p*b, (p+1)*b)` of every global batch: the rows `data.pretrain_iterator` gives it.
    """
    if devices is None:
        # Stable sort: keeps JAX's (topology-aware) order within each process.
        devices = sorted(jax.devices(), key=lambda d: d.process_index)
    order = [d.process_index for d in devices]
    if order != sorted(order):
        raise ValueError(
            f"mesh devices must be grouped by process in process order; got processes {order}"
        )
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, optimizer state)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the 'data' mesh axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """Per-leaf shardings that split each array over 'data' along its largest divisible axis.

    FSDP-style storage for a large frozen network: a device holds 1/n of every leaf whose
    largest axis divisible by the device count n exists (a conv kernel's output channels,
    typically); the others (a BN vector of 3 channels, a scalar) stay replicated. Under `jit`
    XLA gathers what each layer needs: the replicated network's values, up to the order in which
    XLA's partitioned program rounds its sums.
    """
    n = mesh.devices.size

    def one(x: Any) -> NamedSharding:
        shape = np.shape(x)
        axes = [a for a in range(len(shape)) if shape[a] % n == 0 and shape[a] >= n]
        if n == 1 or not axes:
            return replicated(mesh)
        axis = max(axes, key=lambda a: (shape[a], a))  # the largest; the last on ties
        return NamedSharding(
            mesh, P(*(DATA_AXIS if a == axis else None for a in range(len(shape))))
        )

    return jax.tree.map(one, tree)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree` (host or device arrays, or shape structs)."""
    return sum(
        int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Fails with a clear message unless the global batch splits evenly over devices."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"batch_size={global_batch} must be divisible by the number of devices ({n}); "
            f"try {max(n, global_batch // n * n)}"
        )


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into one global array sharded on 'data'."""
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def over_global_batch(
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    num_inputs: int = 2,
    num_outputs: int = 2,
    **kwargs: Any,
) -> Callable[..., Any]:
    """`loss_fn(*rows, axis_name='data', **kwargs)` in `shard_map`: a loss over the global batch.

    Every input is split on 'data' (each device its rows of the batch); the function gathers
    what it needs over `axis_name` (the other devices' rows as candidates), and its outputs
    (loss, metrics, ...) are the same on every device. The shape of every contrastive loss
    here: NT-Xent, CLEAR's, MoCo v3's, DIM's and CPC's estimators.
    """
    return jax.shard_map(
        functools.partial(loss_fn, axis_name=DATA_AXIS, **kwargs),
        mesh=mesh,
        in_specs=(P(DATA_AXIS),) * num_inputs,
        out_specs=(P(),) * num_outputs,
    )
