"""The training CLIs' devices and processes: the ``--devices`` and multi-process flags, joining the
processes before the first computation, the check that they were all started alike, a lost
process's error as one line, and the devices a run splits its batches over (:mod:`common.parallel`
holds the mechanism)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

from experiments._cli import UserError
from common.xla_cpu import _cpu_only

SAME_COMMAND = "start every process with the same command, only --process-id differing"


def start_parallel(config) -> bool:
    """Join the processes of ``config`` (:func:`common.parallel.initialize`) and, on a CPU, ask for
    ``config.devices`` host devices; returns whether this process is the one that logs (process
    0, or a one-process run), found without starting a backend. Must run before the first
    computation."""
    import os

    from common.parallel import JoinTimeout, initialize, joined_process_index

    if config.devices and config.devices > 1 and config.coordinator is None and _cpu_only():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if config.devices > cores:
            raise UserError(f"--devices {config.devices} needs as many CPU cores, this process may use {cores} "
                            "(XLA:CPU host devices beyond the cores deadlock in their all-reduce)")
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", config.devices)
        except RuntimeError:  # the backend is up already (a call from Python): its devices are used
            pass
    run = f"the multi-process run at {config.coordinator}" if config.coordinator else "the cluster JAX detected"
    try:
        joined = initialize(config.coordinator, config.num_processes, config.process_id, config.join_timeout)
    except JoinTimeout as err:  # a process missing, or started with another --coordinator or --num-processes
        raise UserError(f"cannot join {run}: {err}; check that every process was started with the same "
                        "--coordinator and --num-processes, and a --process-id of its own") from None
    except (RuntimeError, ValueError, OSError) as err:  # port taken, coordinator unreachable, ...
        raise UserError(f"cannot join {run}: {str(err).splitlines()[0]}") from None
    return not joined or joined_process_index() == 0


# What a failed cross-process collective says (gloo's on CPUs, NCCL's on GPUs): jax raises it as a
# JaxRuntimeError or, from a jitted call's dispatch, a ValueError.
_LOST_PROCESS = re.compile(r"\b(Gloo|NCCL)\b|Connection (closed|reset) by peer")


def lost_process_hook(previous):
    """A ``sys.excepthook`` (installed by the entry point, :func:`experiments._cli.run`) that, in a
    multi-process run, makes an error of a collective that reaches the top (another process of the
    run stopped) one line on stderr and status 1, the process ending at once after flushing: its
    traceback says nothing more, and the interpreter's shutdown would wait for the lost process
    until the coordination service's heartbeat timeout (:data:`common.parallel.HEARTBEAT_SECONDS`)
    and then abort in C++. Anything else goes to ``previous``."""
    def excepthook(kind, error, traceback):
        import jax

        from common.jax_private import joined
        from experiments._cli import _end

        if joined() is None or not (issubclass(kind, jax.errors.JaxRuntimeError) or _LOST_PROCESS.search(str(error))):
            return previous(kind, error, traceback)
        first = (str(error).strip() or kind.__name__).splitlines()[0]
        print(f"error: another process of this run stopped: {first}; rerun every process with the same "
              "command to resume from the last checkpoint", file=sys.stderr)
        _end(1, hard=True)

    return excepthook


def _processes(indices) -> str:
    indices = sorted(map(int, indices))
    return f"process{'es' if len(indices) > 1 else ''} {', '.join(map(str, indices))}"


def check_same_run(config, data: dict[str, str]) -> None:
    """In a multi-process run, end every process with one line (:class:`UserError`) unless all were
    started with the same ``config`` (but --process-id; --out too: orbax writes one checkpoint from
    all processes, and waits forever for a folder another --out never gets) and read the same data
    (``data``: each split's :func:`common.training.fingerprint`), checked by
    :func:`common.parallel.check_alike` within ``--join-timeout``. No-op in a one-process run."""
    from common.parallel import NotAlike, check_alike

    mine = {**dataclasses.asdict(config), "process_id": None, "quiet": None, "out": str(config.workdir.resolve()),
            "data": data}
    try:
        check_alike(mine, config.join_timeout, "experiments/check_same_run")
    except NotAlike as err:
        raise UserError(_not_alike(err)) from None


def _not_alike(err) -> str:
    """The one line :class:`common.parallel.NotAlike` means for this process."""
    flag = lambda name: "the data" if name == "data" else f"--{name.replace('_', '-')}"  # noqa: E731
    if err.missing == [0]:
        return (f"process 0 did not check the settings of this run within {err.timeout:g} s (it stopped, see its "
                f"output, or is still loading its data: raise --join-timeout); {SAME_COMMAND}")
    if err.here in err.differ:
        details = "; ".join("other data here than on process 0" if name == "data" else
                            f"{flag(name)} {json.dumps(theirs)} here, {json.dumps(mine)} on process 0"
                            for name, theirs, mine in err.differ[err.here])
        return f"this process was started with other settings than process 0 ({details}); {SAME_COMMAND}"
    if err.differ:
        names = ", ".join(sorted({flag(name) for differ in err.differ.values() for name, _, _ in differ}))
        return f"{_processes(err.differ)} of this run started with other settings than process 0 ({names}); {SAME_COMMAND}"
    return (f"{_processes(err.missing)} of this run did not reach the settings check within {err.timeout:g} s "
            f"(stopped, see its output, or still loading its data: raise --join-timeout); {SAME_COMMAND}")


def run_devices(requested: int | None) -> list:
    """The devices a run splits its batches over: the first ``requested`` of all processes'
    devices, or by default every device (one in a one-process CPU run). Raises
    :class:`UserError` when fewer exist."""
    import jax

    from common.parallel import default_devices

    devices = jax.devices()
    if requested is None:
        return default_devices()
    if requested > len(devices):
        raise UserError(f"--devices {requested}: only {len(devices)} device(s) here ({devices[0].platform})")
    if jax.process_count() > 1 and requested != len(devices):
        raise UserError(f"--devices {requested}: a multi-process run uses all {len(devices)} devices of its processes")
    return devices[:requested]
