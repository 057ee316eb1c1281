"""A training run's checkpoints: one orbax ``CheckpointManager`` folder (``<run>/ckpt``).

Every epoch is a numbered step holding the array state (``state``), a JSON dict (``meta``: config,
history, best epoch) and, when it was validated, its selection metric as orbax metrics. orbax's
preservation policy keeps the latest two steps and the best one (``LatestN`` or ``BestN``), and
``best_step()`` finds the best for evaluation, so the best epoch is always a step of the same
folder. Saves are asynchronous and atomic: a save returns once the arrays are copied off the
devices, orbax writes them in a thread while training goes on and commits the step by renaming a
temporary folder (the temporaries of a killed save are removed when the folder is opened again);
the next save, every read and :meth:`Checkpoints.close` wait for it. Saving a step that exists
replaces it. Resuming reads the newest step that can be read and removes newer ones that
cannot.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at INFO


class CheckpointError(Exception):
    """A checkpoint folder that cannot serve: ``directory`` and why (``str(err)``)."""

    def __init__(self, directory: Path, reason: str):
        super().__init__(f"{directory}: {reason}")
        self.directory = directory


class FolderInUse(CheckpointError):
    """Another process holds the run folder's lock."""


class NoReadableStep(CheckpointError):
    """A training run's checkpoint folder that cannot be opened or holds no readable step."""


class EarlierLayout(CheckpointError):
    """A run folder written by an earlier version of the training commands (``best/`` beside ``ckpt/``)."""


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds numbered orbax steps."""
    return path.is_dir() and any(child.name.isdigit() for child in path.iterdir())


def run_checkpoints(path: Path) -> Path | None:
    """The checkpoint folder of the run folder ``path`` (its ``ckpt/``), or ``path`` where it is one
    itself; None where it is neither. Raises :class:`EarlierLayout` for a folder of the two-folder
    layout (``best/`` beside ``ckpt/``), reached through the run folder or either of the two."""
    if (path / "best").is_dir() or path.name == "best" or path.name == "ckpt" and (path.parent / "best").is_dir():
        raise EarlierLayout(path, "written by an earlier version (a best/ folder beside ckpt/)")
    return next((folder for folder in (path / "ckpt", path) if is_checkpoint_dir(folder)), None)


def _ranking(metrics: dict) -> tuple[float, int]:
    """orbax's best_fn: the signed selection value (higher is better), the earlier epoch on ties."""
    return metrics["score"], -metrics["epoch"]


class Checkpoints:
    """One run's checkpoint folder (see the module's docstring). ``read_only``: for evaluation,
    neither create the folder nor remove temporaries (a training run may be writing to it).
    ``lock``: hold an exclusive ``flock`` on ``directory/../.lock`` until :meth:`close`, so a second
    run on the same folder stops (:class:`FolderInUse`) instead of overwriting this one's saves.
    Raises :class:`CheckpointError` where a file stands where the folder belongs."""

    def __init__(self, directory: str | Path, read_only: bool = False, lock: bool = False):
        self.directory = Path(directory).resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(self.directory, "a file where a checkpoint folder belongs")
        self.read_only = read_only
        self._lock = _lock(self.directory.parent) if lock else None
        try:
            self.manager = self._open(read_only)
        except Exception as err:  # noqa: BLE001 - a step's damaged metrics file, read when the folder opens
            if self._lock is not None:
                self._lock.close()
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise NoReadableStep(self.directory, f"cannot be opened ({type(err).__name__}: {reason})") from None

    def _open(self, read_only: bool) -> ocp.CheckpointManager:
        keep = policies.AnyPreservationPolicy([
            policies.LatestN(2),  # the last epoch, and the one before it (a vmapped sweep rewinds to it)
            policies.BestN(get_metric_fn=_ranking, n=1, keep_checkpoints_without_metrics=False)])
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                best_fn=_ranking, best_mode="max", preservation_policy=None if read_only else keep,
                enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only, read_only=read_only,
                create=not read_only),
            item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict, score: float | None = None) -> None:
        """Start writing ``step`` (replacing it if it exists; see the module's docstring); ``score``:
        its selection value, higher better (None: not a candidate for the best, e.g. diverged)."""
        if step in self.steps():
            self.manager.delete(step)
        metrics = None if score is None else {"score": score, "epoch": step + 1}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(copy.deepcopy(meta))),
                          metrics=metrics, force=True)  # a copy: the caller's meta changes while orbax writes

    def steps(self) -> list[int]:
        self.manager.wait_until_finished()
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the best score (the earliest on ties); None before the first scored one."""
        self.manager.wait_until_finished()
        return self.manager.best_step()

    def restore(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        """(state, meta) of ``step``; ``abstract_state`` gives structure, shapes, dtypes and
        shardings. Raises :class:`CheckpointError` where the step cannot be read."""
        restored = self._read(step, state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        """The meta of ``step`` alone (no arrays read); :class:`CheckpointError` where it cannot be read."""
        return self._read(step, meta=ocp.args.JsonRestore())["meta"]

    def _read(self, step: int, **items):
        self.manager.wait_until_finished()
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - orbax reports damaged files with many exception types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise CheckpointError(self.directory, f"step {step} cannot be read ({reason})") from None

    def delete(self, step: int) -> None:
        self.manager.wait_until_finished()
        self.manager.delete(step)

    def resume(self, abstract_state: Any, check_meta: Callable[[dict], None], log: Callable[[str], None]):
        """``(step, state, meta)`` of the newest step that can be read; None
        where there are none. ``check_meta`` sees each step's meta before its arrays are read and
        raises where it belongs to another run (what it raises goes through: that folder is not
        to be resumed, nor any of its steps removed). A step that cannot be read is skipped with
        one line in ``log`` (and removed, unless read only). Raises :class:`CheckpointError` when
        none can be read."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                check_meta(self.read_meta(step))
                state, meta = self.restore(abstract_state, step)
            except CheckpointError as err:
                log(f"note: {err}; skipping it")
                if not self.read_only:
                    self.delete(step)
                continue
            return step, state, meta
        if not steps:
            return None
        raise NoReadableStep(self.directory, "no readable checkpoint step")

    def close(self) -> None:
        try:
            self.manager.close()
        finally:
            if self._lock is not None:
                self._lock.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(directory: Path):
    """An exclusive, non-blocking ``flock`` on ``directory/.lock``, held while the returned file is
    open (the system releases it when the process ends, however it ends). In a multi-process run
    process 0 holds it for all (the others get a handle that holds nothing)."""
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        return open(os.devnull, "a")
    handle = open(directory / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FolderInUse(directory, "another run is using this folder") from None
    return handle


class _FailedReadLeftovers(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for the reads of a restore that failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


def quiet_failed_reads() -> None:
    """When one array of a restore cannot be read, orbax gives up and closes the event loop it ran
    the restore in, while tensorstore is still completing the other reads: each of them then
    printed an "Event loop is closed" traceback (through ``sys.unraisablehook``, from tensorstore's
    threads, at any moment after) or an asyncio "Task exception was never retrieved" log, after
    the one line that reports the damaged step. Those, and only those, are dropped; installed by
    the entry point before the first read because they can come before the failure reaches the caller."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable) -> None:
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and frames and frames[0].name == "call_soon_threadsafe"):
            return
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadLeftovers) for f in asyncio_log.filters):
        asyncio_log.addFilter(_FailedReadLeftovers())
