"""Data parallelism on JAX's own runtime, shared by both trainers.

One mesh axis, ``data``, over the devices of every process (:func:`data_mesh`). A training step is
one jitted program over a global batch sharded along that axis, with parameters and optimiser
state replicated; XLA inserts the gradient all-reduce (and BatchNorm's cross-device statistics).
Each process draws the same batch indices and feeds only the rows of its own devices
(:func:`global_batch`, :func:`global_indices`, ``jax.make_array_from_process_local_data``). Processes are joined with
``jax.distributed`` (:func:`initialize`); on CPUs their collectives go through gloo.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"  # the mesh axis a batch is split along


def cluster_detected() -> bool:
    """Whether JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, GKE, Kubernetes) finds an
    environment that ``jax.distributed.initialize()`` can join without arguments."""
    from common.jax_private import cluster_environments

    try:
        return any(env.is_env_present() for env in cluster_environments())
    except Exception:  # a detector that cannot run here (missing tool, unreadable metadata)
        return False


def check_process_flags(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Raise ``ValueError`` (naming the command-line flags) unless the three multi-process settings
    are all given or all absent, ``coordinator`` is HOST:PORT with a port in 1..65535 and
    ``process_id`` lies in 0..num_processes-1: the one check of them, before JAX sees them (a
    missing port was an IndexError there, a bad one a silent hang)."""
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs --coordinator, --num-processes and --process-id together")
    if not any(given):
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--coordinator must be HOST:PORT with a port in 1..65535, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be a positive integer, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must lie in 0..{num_processes - 1}, got {process_id}")


def check_port_free(coordinator: str) -> None:
    """Raise ``OSError`` where process 0 cannot listen on the coordinator's port: JAX's service binds
    it on every address of this machine (``[::]:PORT``, as gRPC does, with ``SO_REUSEADDR``) and
    crashes the process when it is taken."""
    host, _, port = coordinator.rpartition(":")
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here: gRPC falls back to IPv4 too
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, int(port)))
                probe.listen(1)
            except OSError as err:
                raise OSError(f"port {port} on {host.strip('[]')} is in use ({err.strerror}) by another program "
                              "or another process 0 (is --process-id 0 given twice?): give every process a "
                              "--coordinator with a free port") from None
        return


# The heartbeat timeout of the coordination service (``heartbeat_timeout_seconds``): a process that
# sends no heartbeat for this long (a frozen or unreachable host; a process that exits closes its
# collectives' connections, which the others see at once) counts as dead, and JAX then aborts every
# other process with its own log line: the bound on how long the survivors of a lost process wait.
# Process 0 holds the service, so where it stops the others' JAX may abort the same way at once,
# racing the one-line error of experiments._parallel.
HEARTBEAT_SECONDS = 100
# JAX's own join timeout is this much longer than ours: JAX aborts the process at its timeout.
_JAX_JOIN_MARGIN = 10


class JoinTimeout(TimeoutError):
    """Not every process joined within the timeout of :func:`initialize`. The process still has a
    thread blocked in JAX's join and must end without the interpreter's shutdown (``os._exit``)."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout: float = 300) -> bool:
    """Join the processes of a multi-process run with ``jax.distributed.initialize``; returns
    whether it did.

    With ``coordinator`` ("HOST:PORT", process 0's address), ``num_processes`` and ``process_id``
    given, those; with none given, where :func:`cluster_detected`, what JAX detects; otherwise a
    plain one-process run and nothing happens. Must run before the first computation. On CPUs the
    cross-process collectives use gloo (``jax_cpu_collectives_implementation``).

    JAX's join blocks in C++, where Python's signal handlers cannot run, and aborts the process
    when its own timeout passes; so it runs in a daemon thread while this thread waits in Python
    (Ctrl-C works) and gives up first, raising :class:`JoinTimeout` after ``timeout`` seconds.
    Raises ``ValueError`` for inconsistent settings (:func:`check_process_flags`), ``OSError`` when
    process 0's port is taken (:func:`check_port_free`), and what JAX raises.
    """
    check_process_flags(coordinator, num_processes, process_id)
    if coordinator is None and not cluster_detected():
        return False
    if process_id == 0:
        check_port_free(coordinator)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    failure: list[BaseException] = []

    def join() -> None:
        try:
            jax.distributed.initialize(coordinator, num_processes, process_id,
                                       initialization_timeout=math.ceil(timeout) + _JAX_JOIN_MARGIN,
                                       heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
        except BaseException as err:  # handed to the waiting thread
            failure.append(err)

    thread = threading.Thread(target=join, name="jax.distributed.initialize", daemon=True)
    deadline = time.monotonic() + timeout
    thread.start()
    while thread.is_alive():
        if time.monotonic() > deadline:
            raise JoinTimeout(f"not all {num_processes or 'the'} processes joined within {timeout:g} s")
        thread.join(0.2)
    if failure:
        raise failure[0]
    return True


class NotAlike(Exception):
    """Processes of a run that were not started alike (:func:`check_alike`). ``differ``: for each
    process whose value differs from process 0's, the names of the entries that differ, with that
    process's and process 0's values; ``missing``: processes whose value did not come in time
    (``[0]`` on another process: process 0's verdict did not come); ``here``: this process."""

    def __init__(self, differ: dict[int, list[tuple[str, Any, Any]]], missing: list[int], here: int, timeout: float):
        super().__init__(f"processes {sorted(differ)} differ, {missing} missing")
        self.differ, self.missing, self.here, self.timeout = differ, missing, here, timeout


def _wait_for(client, key: str, deadline: float) -> str | None:
    """The value of ``key`` in the coordination service's key-value store once a process posts it,
    or None at ``deadline``; polled from Python, so that Ctrl-C works while it waits."""
    while True:
        try:
            return client.key_value_try_get(key)
        except jax.errors.JaxRuntimeError:  # NOT_FOUND: not posted yet
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


def check_alike(value: dict, timeout: float, key: str = "check_alike") -> None:
    """In a multi-process run, raise :class:`NotAlike` on every process unless every process
    passed the same JSON-ready ``value`` (its settings and data fingerprints): processes started
    differently would hang or fail in their first collective, or train different models in step.
    Each process posts its value to the coordination service's key-value store; process 0 compares
    them with its own and posts the verdict, which the others wait for. The waits last at most
    ``timeout`` seconds (a process that stopped before the check, or is still loading its data).
    No-op in a one-process run."""
    from common.jax_private import joined

    run = joined()
    if run is None:
        return
    client, here = run.client, run.process_id
    mine = json.loads(json.dumps(value, sort_keys=True, default=str))
    client.key_value_set(f"{key}/{here}", json.dumps(mine))
    if here == 0:
        verdict = _verdict(client, key, mine, run.num_processes, timeout)
    else:
        posted = _wait_for(client, f"{key}/verdict", time.monotonic() + timeout + 10)  # after process 0's deadline
        if posted is None:
            raise NotAlike({}, [0], here, timeout)
        client.key_value_set(f"{key}/read/{here}", "1")
        verdict = json.loads(posted)
    differ = {int(k): [tuple(d) for d in v] for k, v in verdict["differ"].items()}
    if differ or verdict["missing"]:
        raise NotAlike(differ, verdict["missing"], here, timeout)


def _verdict(client, key: str, mine: dict, processes: int, timeout: float) -> dict:
    """Process 0's side of :func:`check_alike`: every other process's value compared with its own,
    the verdict posted (and, where the run must stop, read by the others before it returns)."""
    deadline = time.monotonic() + timeout
    verdict = {"differ": {}, "missing": []}
    for other in range(1, processes):
        posted = _wait_for(client, f"{key}/{other}", deadline)
        if posted is None:
            verdict["missing"].append(other)
            continue
        theirs = json.loads(posted)
        differ = [(name, theirs.get(name), mine.get(name)) for name in sorted(set(mine) | set(theirs))
                  if mine.get(name) != theirs.get(name)]
        if differ:
            verdict["differ"][str(other)] = differ
    client.key_value_set(f"{key}/verdict", json.dumps(verdict))
    if verdict["differ"] or verdict["missing"]:  # the service ends with this process: let the others read first
        deadline = time.monotonic() + 30
        for other in set(range(1, processes)) - set(verdict["missing"]):
            _wait_for(client, f"{key}/read/{other}", deadline)
    return verdict


def joined_process_index() -> int:
    """This process's index in the run :func:`initialize` joined (0 where it joined none), read
    without starting a backend (``jax.process_index`` starts one)."""
    from common.jax_private import joined

    run = joined()
    return 0 if run is None else run.process_id


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


def global_indices(sharding: NamedSharding, indices: np.ndarray) -> jax.Array:
    """Host indices (K, B) that every process holds in full -> a global array whose B columns are
    split like a batch's rows by ``sharding`` (:func:`batch_sharding`; K whole), each process
    sending only the columns of its own devices. Raises ``ValueError`` when B is not a multiple
    of the devices along ``data``."""
    indices = np.asarray(indices)
    columns = local_rows(sharding, indices.shape[1])
    spec = NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return jax.make_array_from_process_local_data(spec, np.ascontiguousarray(indices[:, columns]), indices.shape)


def put_replicated(mesh: Mesh, tree):
    """Host arrays that every process holds in full -> arrays replicated on every device of ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(array) -> np.ndarray:
    """A jax array as a host NumPy array in every process: a replicated array from the local copy,
    a sharded one gathered across processes (``multihost_utils.process_allgather``)."""
    if not isinstance(array, jax.Array):
        return np.asarray(array)
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))  # an explicit transfer (jax.transfer_guard allows it)
    if array.is_fully_replicated:
        return np.asarray(jax.device_get(array.addressable_data(0)))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
