"""Orbax checkpoints of a pytree of arrays plus a JSON side-car, shared by the training CLIs.

A directory holds one orbax ``CheckpointManager``: numbered steps (epochs), each with the array
state (``state``) and a JSON dict (``meta``: history, config). Saves are synchronous and atomic
(orbax writes to a temporary name and renames; temporaries left by a killed save are removed when
the directory is opened again). Saving a step that exists replaces it, so a resumed run that
repeats an epoch writes that epoch's checkpoint again instead of failing. Restoring skips a step
that cannot be read (a damaged file), with one line saying so, in favour of the newest readable one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp

from experiments._cli import UserError

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at INFO


class CheckpointError(UserError):
    """No step of a checkpoint directory can be read."""


class Checkpoints:
    def __init__(self, directory: str | Path, max_to_keep: int | None = 2):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True),
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
        raise CheckpointError(f"{self.directory}: no readable checkpoint; remove the folder or choose another one")

    def newest_meta(self, log: Callable[[str], None]) -> dict:
        """The meta of the newest step whose meta can be read (steps that cannot are skipped with
        one line in ``log``); raises :class:`CheckpointError` when there is none."""
        for step in reversed(self.steps()):
            try:
                return self.read_meta(step)
            except Exception as err:
                self._skip(step, err, log)
        raise CheckpointError(f"{self.directory}: no readable checkpoint; remove the folder or choose another one")

    def _skip(self, step: int, err: Exception, log: Callable[[str], None]) -> None:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        log(f"note: checkpoint step {step} in {self.directory} cannot be read ({reason}); skipping it")

    def close(self) -> None:
        self.manager.close()


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds numbered orbax steps."""
    return path.is_dir() and any(child.name.isdigit() for child in path.iterdir())


class RunCheckpoints:
    """A training run's two checkpoint folders: ``ckpt`` (every epoch, the last two kept) and
    ``best`` (the best validation epoch). Each epoch is saved to ``ckpt`` first, then, if it is
    the best, to ``best``, so that a run killed at any moment leaves ``ckpt`` at most one epoch
    behind ``best`` and :meth:`resume` can mend the gap."""

    def __init__(self, directory: Path):
        self.latest = Checkpoints(directory / "ckpt", max_to_keep=2)
        self.best = Checkpoints(directory / "best", max_to_keep=1)

    def resume(self, abstract_state: Any, check_meta: Callable[[dict], None], log: Callable[[str], None]):
        """None for a new run, else ``(state, meta)`` of the newest readable epoch (its meta has
        ``best_epoch``). If that epoch was the best one and was killed before reaching ``best``,
        it is saved there now."""
        if not self.latest.steps():
            return None
        step, state, meta = self.latest.resume(abstract_state, check_meta, log)
        if meta.get("best_epoch") == step + 1 and self.best.latest_step() != step:
            self.best.save(step, state, meta)
        return state, meta

    def save_epoch(self, epoch: int, state: Any, meta: dict, best: bool) -> None:
        """Epoch ``epoch`` (0-based) to ``ckpt`` and, if ``best``, to ``best``."""
        self.latest.save(epoch, state, meta)
        if best:
            self.best.save(epoch, state, meta)

    def close(self) -> None:
        self.latest.close()
        self.best.close()
