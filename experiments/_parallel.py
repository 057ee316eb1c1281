"""The training CLIs' devices and processes: the ``--devices`` and multi-process flags, joining the
processes before the first computation, the check that they were all started alike, a lost
process's error as one line, and the devices a run splits its batches over (:mod:`common.parallel`
holds the mechanism)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time

from experiments._cli import UserError
from experiments._xla import _cpu_only

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


def _wait_for(client, key: str, deadline: float) -> str | None:
    """The value of ``key`` in the coordination service's key-value store once a process posts it,
    or None at ``deadline``; polled from Python, so that Ctrl-C works while it waits."""
    import jax

    while True:
        try:
            return client.key_value_try_get(key)
        except jax.errors.JaxRuntimeError:  # NOT_FOUND: not posted yet
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


def _processes(indices) -> str:
    indices = sorted(map(int, indices))
    return f"process{'es' if len(indices) > 1 else ''} {', '.join(map(str, indices))}"


def check_same_run(config, data: dict[str, str]) -> None:
    """In a multi-process run, end every process with one line (:class:`UserError`) unless all were
    started with the same ``config`` (but --process-id; --out too: orbax writes one checkpoint
    from all processes, and waits forever for a folder another --out never gets) and read the same
    data (``data``: each split's :func:`experiments._training.fingerprint`): processes that differ
    would hang or fail in their first collective, or train different models in step. Each process posts both to the coordination
    service's key-value store; process 0 compares them with its own and posts the verdict, which
    the others wait for. The waits last at most ``--join-timeout`` seconds (a process that stopped
    before the check, or is still loading its data). No-op in a one-process run."""
    from common.jax_private import joined

    run = joined()
    if run is None:
        return
    client, index, key = run.client, run.process_id, "experiments/check_same_run"
    mine = {**dataclasses.asdict(config), "process_id": None, "quiet": None, "out": str(config.workdir.resolve()),
            "data": data}
    mine = json.loads(json.dumps(mine, sort_keys=True, default=str))
    client.key_value_set(f"{key}/{index}", json.dumps(mine))
    timeout = config.join_timeout
    if index == 0:
        verdict = _verdict(client, key, mine, run.num_processes, timeout)
    else:
        posted = _wait_for(client, f"{key}/verdict", time.monotonic() + timeout + 10)  # after process 0's deadline
        if posted is None:
            raise UserError(f"process 0 did not check the settings of this run within {timeout:g} s (it "
                            f"stopped, see its output, or is still loading its data: raise --join-timeout); {SAME_COMMAND}")
        client.key_value_set(f"{key}/read/{index}", "1")
        verdict = json.loads(posted)
    _raise_verdict(verdict, index, timeout)


def _differences(mine: dict, theirs: dict) -> list[tuple[str, str]]:
    """(what, detail) for each setting of another process that differs from process 0's."""
    flag = lambda name: f"--{name.replace('_', '-')}"  # noqa: E731
    return [("the data", "other data here than on process 0") if name == "data" else
            (flag(name), f"{flag(name)} {json.dumps(theirs.get(name))} here, {json.dumps(mine.get(name))} on process 0")
            for name in sorted(set(mine) | set(theirs)) if mine.get(name) != theirs.get(name)]


def _verdict(client, key: str, mine: dict, processes: int, timeout: float) -> dict:
    """Process 0's side of :func:`check_same_run`: every other process's post compared with its
    own, the verdict posted (and, where the run must stop, read by the others before it returns)."""
    deadline = time.monotonic() + timeout
    verdict = {"differ": {}, "missing": []}
    for other in range(1, processes):
        posted = _wait_for(client, f"{key}/{other}", deadline)
        if posted is None:
            verdict["missing"].append(other)
        elif differences := _differences(mine, json.loads(posted)):
            verdict["differ"][str(other)] = differences
    client.key_value_set(f"{key}/verdict", json.dumps(verdict))
    if verdict["differ"] or verdict["missing"]:  # the service ends with this process: let the others read first
        deadline = time.monotonic() + 30
        for other in set(range(1, processes)) - set(verdict["missing"]):
            _wait_for(client, f"{key}/read/{other}", deadline)
    return verdict


def _raise_verdict(verdict: dict, index: int, timeout: float) -> None:
    """The one-line :class:`UserError` a verdict of :func:`_verdict` means for process ``index``."""
    if str(index) in verdict["differ"]:
        details = "; ".join(detail for _, detail in verdict["differ"][str(index)])
        raise UserError(f"this process was started with other settings than process 0 ({details}); {SAME_COMMAND}")
    if verdict["differ"]:
        names = ", ".join(sorted({name for differences in verdict["differ"].values() for name, _ in differences}))
        raise UserError(f"{_processes(verdict['differ'])} of this run started with other settings than process 0 "
                        f"({names}); {SAME_COMMAND}")
    if verdict["missing"]:
        raise UserError(f"{_processes(verdict['missing'])} of this run did not reach the settings check within "
                        f"{timeout:g} s (stopped, see its output, or still loading its data: raise --join-timeout); "
                        f"{SAME_COMMAND}")


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
