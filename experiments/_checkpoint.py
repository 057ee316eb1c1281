"""Orbax checkpoints of a pytree of arrays plus a JSON side-car, shared by the training CLIs.

A directory holds one orbax ``CheckpointManager``: numbered steps (epochs), each with the array
state (``state``) and a JSON dict (``meta``: history, config). Saves are synchronous, so a
checkpoint on disk is complete; orbax writes to a temporary name and renames, so an interrupted
save leaves the previous one intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at INFO


class Checkpoints:
    def __init__(self, directory: str | Path, max_to_keep: int | None = 2):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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

    def close(self) -> None:
        self.manager.close()


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds numbered orbax steps."""
    return path.is_dir() and any(child.name.isdigit() for child in path.iterdir())

