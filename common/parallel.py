"""Data parallelism on JAX's own runtime, shared by both trainers.

One mesh axis, ``data``, over the devices of every process (:func:`data_mesh`). A training step is
one jitted program over a global batch sharded along that axis, with parameters and optimiser
state replicated; XLA inserts the gradient all-reduce (and BatchNorm's cross-device statistics).
Each process draws the same batch indices and feeds only the rows of its own devices
(:func:`global_batch`, ``jax.make_array_from_process_local_data``). Processes are joined with
``jax.distributed`` (:func:`initialize`); on CPUs their collectives go through gloo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"  # the mesh axis a batch is split along


def cluster_detected() -> bool:
    """Whether JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, GKE, Kubernetes) finds an
    environment that ``jax.distributed.initialize()`` can join without arguments."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # private module moved: detection off, the flags still work
        return False
    try:
        return any(env.is_env_present() for env in ClusterEnv._cluster_types if not env.opt_in_only_method)
    except Exception:  # a detector that cannot run here (missing tool, unreadable metadata)
        return False


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join the processes of a multi-process run with ``jax.distributed.initialize``; returns
    whether it did.

    With ``coordinator`` ("HOST:PORT", process 0's address), ``num_processes`` and ``process_id``
    given, those; with none given, where :func:`cluster_detected`, what JAX detects; otherwise a
    plain one-process run and nothing happens. Must run before the first computation. On CPUs the
    cross-process collectives use gloo (``jax_cpu_collectives_implementation``). Raises
    ``ValueError`` when only some of the three are given.
    """
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs all three of coordinator, num_processes and process_id")
    if not any(given) and not cluster_detected():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def is_main_process() -> bool:
    """Whether this process writes results, plots and progress (process 0)."""
    return jax.process_index() == 0


def default_devices() -> list[jax.Device]:
    """The devices a batch is split over by default: every device of every process, except in a
    one-process CPU run, which uses one (XLA:CPU already spreads one device's work over the cores,
    and more host devices add an all-reduce; docs/performance.md)."""
    devices = jax.devices()
    return devices[:1] if devices[0].platform == "cpu" and jax.process_count() == 1 else devices


def in_process_collectives(mesh: Mesh) -> bool:
    """Whether one process holds several CPU devices of ``mesh``: their all-reduce is XLA:CPU's
    in-process rendezvous, which deadlocks when the host queues a second step before the first
    ends (``python -m benchmarks.cpu_allreduce``), so the trainers then wait for each step."""
    return mesh.devices.flat[0].platform == "cpu" and len(mesh.local_devices) > 1


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``data`` over ``devices`` (default :func:`default_devices`, in process
    order, so that each process's devices hold one contiguous block of a batch's rows)."""
    devices = list(default_devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split along ``data``; other axes whole."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def local_rows(sharding: NamedSharding, rows: int) -> slice:
    """The rows of a ``rows``-row global batch that this process's devices hold under ``sharding``
    (one contiguous block; everything in a one-process run). Raises ``ValueError`` when ``rows`` is
    not a multiple of the devices along ``data``."""
    devices = sharding.mesh.shape[DATA]
    if rows % devices:
        raise ValueError(f"a batch of {rows} rows cannot be split evenly over {devices} devices")
    starts = sorted({index[0].start or 0 for index in sharding.addressable_devices_indices_map((rows,)).values()})
    per_device = rows // devices
    return slice(starts[0], starts[-1] + per_device)


def global_batch(sharding: NamedSharding, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """A batch every process holds in full on the host (a dict of arrays with the same leading
    size B) -> global arrays sharded by ``sharding``, each process sending only its own rows."""
    arrays = {}
    for name, value in batch.items():
        value = np.asarray(value)
        rows = local_rows(sharding, value.shape[0])
        arrays[name] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
    return arrays


def put_replicated(mesh: Mesh, tree):
    """Host arrays that every process holds in full -> arrays replicated on every device of ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(array) -> np.ndarray:
    """A jax array as a host NumPy array in every process: a replicated array from the local copy,
    a sharded one gathered across processes (``multihost_utils.process_allgather``)."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
