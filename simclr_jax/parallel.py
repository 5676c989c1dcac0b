"""Device mesh, multi-host start-up, and placement of host batches as global arrays."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.experimental.multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

log = logging.getLogger(__name__)


def maybe_initialize_distributed(config: Any) -> None:
    """Starts JAX's multi-controller runtime when `config.distributed.enabled` (idempotent).

    Empty/zero/-1 fields are left to JAX's auto-detection (TPU VMs, SLURM). A coordinator that
    never answers fails after `initialization_timeout` seconds with a message naming it.
    """
    dc = config.distributed
    if not dc.enabled or jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend to talk to each other; GPU/TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": int(dc.initialization_timeout)}
    if dc.coordinator_address:
        kwargs["coordinator_address"] = dc.coordinator_address
    if dc.num_processes > 0:
        kwargs["num_processes"] = int(dc.num_processes)
    if dc.process_id >= 0:
        kwargs["process_id"] = int(dc.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that failed
        raise RuntimeError(
            f"jax.distributed.initialize failed with {kwargs}: {e}. Check that the coordinator "
            "address is reachable from every process and that every process was started."
        ) from e
    log.info(
        "process %d/%d: %d local of %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """One-axis mesh ('data') over all devices of all processes (or the given devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, optimizer state)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the 'data' mesh axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


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


def global_to_host(tree: Any) -> Any:
    """Fetches fully-replicated or fully-addressable arrays to numpy on every host."""
    return jax.tree.map(
        lambda x: (
            np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))
            if isinstance(x, jax.Array) and not x.is_fully_addressable
            else np.asarray(x)
        ),
        tree,
    )
