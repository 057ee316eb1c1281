"""Orbax checkpoints of a pytree of arrays plus a JSON side-car, shared by the training CLIs.

A directory holds one orbax ``CheckpointManager``: numbered steps (epochs), each with the array
state (``state``) and a JSON dict (``meta``: history, config). Saves are synchronous and atomic
(orbax writes to a temporary name and renames; temporaries left by a killed save are removed when
the directory is opened again). Saving a step that exists replaces it, so a resumed run that
repeats an epoch writes that epoch's checkpoint again instead of failing. Restoring skips a step
that cannot be read (a damaged file), with one line saying so, in favour of the newest readable one.
A training run's two folders (:class:`RunCheckpoints`) are locked against a second run and mended
on resume.
"""

from __future__ import annotations

import fcntl
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp

from experiments._cli import UserError, warn

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at INFO


class _FailedReadLeftovers(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for the reads of a restore that failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


def _quiet_failed_reads() -> None:
    """When one array of a restore cannot be read, orbax gives up and closes the event loop it ran
    the restore in, while tensorstore is still completing the other reads: each of them then
    printed an "Event loop is closed" traceback (through ``sys.unraisablehook``, from tensorstore's
    threads, at any moment after) or an asyncio "Task exception was never retrieved" log, after
    the one line that reports the damaged step. Those, and only those, are dropped; installed
    before the first read because they can come before the failure reaches the caller."""
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


class CheckpointError(UserError):
    """No step of a checkpoint directory can be read."""


class Checkpoints:
    """One orbax ``CheckpointManager`` folder of numbered steps (see the module's docstring)."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 2, read_only: bool = False):
        """``read_only``: for evaluation, neither create the folder nor remove the temporaries of
        saves in progress (a training run may be writing to it)."""
        self.directory = Path(directory).resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.directory}: a file where a checkpoint folder belongs "
                            "(expected a folder of numbered orbax steps); move it away or choose another --out")
        _quiet_failed_reads()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=not read_only, read_only=read_only,
                                                 create=not read_only),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write ``step`` (replacing it if it exists) and return once it is on disk."""
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of ``step`` (the latest by default); ``abstract_state`` gives structure,
        shapes, dtypes and shardings (``jax.eval_shape`` of the initial state)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["meta"]

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def readable(self, abstract_state: Any, step: int) -> tuple[Any, dict] | None:
        """``(state, meta)`` of ``step``, or None where it is missing or cannot be read."""
        if step not in self.manager.all_steps():
            return None
        try:
            return self.restore(abstract_state, step)
        except Exception:  # noqa: BLE001 - orbax reports damaged files with many exception types
            return None

    def delete(self, step: int) -> None:
        self.manager.delete(step)

    def resume(self, abstract_state: Any, check_meta: Callable[[dict], None], log: Callable[[str], None]):
        """``(step, state, meta)`` of the newest step that can be read. ``check_meta`` sees each
        step's meta before its arrays are read and raises (e.g. a one-line user error) when the
        checkpoint belongs to another kind of run; a step that cannot be read is skipped with one
        line in ``log``. Raises :class:`CheckpointError` when no step can be read."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as err:  # orbax reports damaged files with many exception types
                self._skip(step, err, log)
                continue
            check_meta(meta)
            try:
                state, meta = self.restore(abstract_state, step)
            except Exception as err:
                self._skip(step, err, log)
                continue
            return step, state, meta
        raise self._none_readable()

    def _none_readable(self) -> CheckpointError:
        if not self.steps():
            return CheckpointError(f"{self.directory}: no checkpoint steps (the folder is empty or was removed)")
        return CheckpointError(f"{self.directory}: no readable checkpoint; remove the folder or choose another one")

    def newest_meta(self, log: Callable[[str], None]) -> dict:
        """The meta of the newest step whose meta can be read (steps that cannot are skipped with
        one line in ``log``); raises :class:`CheckpointError` when there is none."""
        for step in reversed(self.steps()):
            try:
                return self.read_meta(step)
            except Exception as err:
                self._skip(step, err, log)
        raise self._none_readable()

    def _skip(self, step: int, err: Exception, log: Callable[[str], None]) -> None:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        log(f"note: checkpoint step {step} in {self.directory} cannot be read ({reason}); skipping it")

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds numbered orbax steps."""
    return path.is_dir() and any(child.name.isdigit() for child in path.iterdir())


class BestCheckpoint:
    """A checkpoint folder to evaluate, read only. For a training run's ``best/`` that cannot be
    read (damaged or removed) the same epoch is read from the run's ``ckpt/`` while that still
    keeps it, with one line saying so. Has the reading interface of :class:`Checkpoints`."""

    def __init__(self, directory: str | Path):
        directory = Path(directory).resolve()
        self.checkpoints = Checkpoints(directory, read_only=True)
        self.directory = self.checkpoints.directory
        ckpt = directory.parent / "ckpt"
        self.fallback = Checkpoints(ckpt, read_only=True) if directory.name == "best" and is_checkpoint_dir(ckpt) else None

    def newest_meta(self, log: Callable[[str], None]) -> dict:
        try:
            return self.checkpoints.newest_meta(log)
        except CheckpointError:
            if self.fallback is None:
                raise
            return self.fallback.newest_meta(log)

    def resume(self, abstract_state: Any, check_meta: Callable[[dict], None], log: Callable[[str], None]):
        """``(step, state, meta)`` of the best epoch (see the class)."""
        try:
            return self.checkpoints.resume(abstract_state, check_meta, log)
        except CheckpointError as err:
            if self.fallback is None:
                raise
            meta = self.fallback.newest_meta(log)
            check_meta(meta)
            best_epoch = meta.get("best_epoch")
            held = None if best_epoch is None else self.fallback.readable(abstract_state, best_epoch - 1)
            if held is None:
                where = "cannot be read there either" if best_epoch - 1 in self.fallback.steps() else "is no longer there"
                raise CheckpointError(f"{err}; its best epoch ({best_epoch}) in {self.fallback.directory} {where}") from None
            log(f"note: {self.directory} cannot be read; using the same epoch ({best_epoch}) from "
                f"{self.fallback.directory}")
            check_meta(held[1])
            return best_epoch - 1, held[0], held[1]

    def close(self) -> None:
        self.checkpoints.close()
        if self.fallback is not None:
            self.fallback.close()

    def __enter__(self) -> BestCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(directory: Path):
    """An exclusive, non-blocking ``flock`` on ``directory/.lock``, held while the returned file is
    open (the system releases it when the process ends, however it ends). In a multi-process run
    process 0 holds it for all (the others get a handle that holds nothing)."""
    import os

    import jax

    if jax.process_index() != 0:
        return open(os.devnull, "a")
    handle = open(directory / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another run is using {directory}; wait for it to end or choose another --out") from None
    return handle


class RunCheckpoints:
    """A training run's two checkpoint folders: ``ckpt`` (every epoch, the last two kept) and
    ``best`` (the best validation epoch). Each epoch is saved to ``ckpt`` first, then, if it is
    the best, to ``best``, so that a run killed at any moment leaves ``ckpt`` at most one epoch
    behind ``best`` and :meth:`resume` can mend the gap. The run directory is locked (``.lock``)
    from here to :meth:`close`, so that a second run on it stops with one line instead of
    cleaning up or overwriting this one's saves.

    ``problem`` is None, or one line saying that ``best`` does not hold the best epoch (it could
    not be rebuilt); the run's summary reports it."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(directory)
        try:
            self.latest = Checkpoints(directory / "ckpt", max_to_keep=2)
            self.best = Checkpoints(directory / "best", max_to_keep=1)
        except BaseException:
            self._lock.close()
            raise
        self.problem: str | None = None

    def resume(self, abstract_state: Any, check_meta: Callable[[dict], None], log: Callable[[str], None]):
        """None for a new run, else ``(state, meta)`` of the newest readable epoch (its meta has
        ``best_epoch``); steps of ``ckpt`` skipped as unreadable are removed. When no step of
        ``ckpt`` can be read, the run resumes from ``best``. ``best`` is then made to hold
        the best epoch: rebuilt from ``ckpt`` (the resumed epoch, or the best one while ``ckpt``
        still keeps it), with one line in ``log``; where it cannot be, :attr:`problem` says so,
        on stderr too."""
        if not self.latest.steps():
            if self.best.steps():
                raise UserError(f"{self.best.directory} holds a checkpoint but {self.latest.directory} none; "
                                "remove best/ to start afresh or choose another --out")
            return None
        try:
            step, state, meta = self.latest.resume(abstract_state, check_meta, log)
            unreadable = [newer for newer in self.latest.steps() if newer > step]
        except CheckpointError:
            if not self.best.steps():
                raise
            step, state, meta = self.best.resume(abstract_state, check_meta, log)
            unreadable = self.latest.steps()
            log(f"note: no step of {self.latest.directory} can be read; resuming from {self.best.directory} "
                f"(epoch {step + 1}); the epochs after it are trained again")
        for bad in unreadable:  # skipped above: their epochs are trained and saved again
            self.latest.delete(bad)
        self._mend_best(step, state, meta, abstract_state, check_meta, log)
        return state, meta

    def _mend_best(self, step: int, state: Any, meta: dict, abstract_state: Any,
                   check_meta: Callable[[dict], None], log: Callable[[str], None]) -> None:
        """Make ``best`` hold exactly the step of ``meta["best_epoch"]``, readable."""
        if meta.get("best_epoch") is None:  # no epoch has been the best yet (e.g. the first diverged)
            return
        best_step = meta["best_epoch"] - 1
        for other in self.best.steps():
            if other > step:  # saved before ckpt's copy of that epoch was lost: trained again
                self.best.delete(other)
        held = self.best.readable(abstract_state, best_step)
        if held is not None:
            check_meta(held[1])
            return
        source = (state, meta) if best_step == step else self.latest.readable(abstract_state, best_step)
        if source is None:
            what = "cannot be read" if best_step in self.best.steps() else "is missing"
            self.problem = (f"{self.best.directory}: the best epoch ({best_step + 1}) {what} and {self.latest.directory} "
                            "no longer holds it, so it cannot be rebuilt; best/ is written again only if a later "
                            "epoch improves on it")
            warn(f"warning: {self.problem}")
            return
        for other in self.best.steps():
            self.best.delete(other)
        self.best.save(best_step, *source)
        log(f"note: {self.best.directory} did not hold the best epoch ({best_step + 1}) readable; "
            f"saved it there from {self.latest.directory}")

    def save_epoch(self, epoch: int, state: Any, meta: dict, best: bool) -> None:
        """Epoch ``epoch`` (0-based) to ``ckpt`` and, if ``best``, to ``best``."""
        self.latest.save(epoch, state, meta)
        if best:
            self.best.save(epoch, state, meta)
            self.problem = None

    def close(self) -> None:
        """Close both folders and release the run directory's lock."""
        try:
            self.latest.close()
            self.best.close()
        finally:
            self._lock.close()
