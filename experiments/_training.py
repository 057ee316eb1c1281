"""What the two training commands share around the training loop (:mod:`common.training`): the
``metrics.json`` every run writes and reads back, and the checks of ``--batch-size`` against the
data and the devices."""

from __future__ import annotations

from pathlib import Path

from common.checkpoint import run_checkpoints
from common.training import Run
from experiments._cli import UserError, read_json, write_json


def metrics(part: str, config: dict, runs: dict[str, Run], selected: str | None, test: dict | None, **extra) -> dict:
    """The ``metrics.json`` of both parts: the resolved config, each run's meta (its config,
    per-epoch history, best epoch and value, divergence), the selected run with its best epoch,
    checkpoint and validation record, the test metrics of that checkpoint, and the training wall
    time (the sum of the epochs' seconds)."""
    chosen = None
    if selected is not None:
        run = runs[selected]
        chosen = {"run": selected, "epoch": run.meta["best_epoch"], "checkpoint": str(run.directory / "ckpt"),
                  "val": run.meta["history"][run.meta["best_epoch"] - 1]}
    return {"part": part, "config": config, **extra, "runs": {name: run.meta for name, run in runs.items()},
            "selected": chosen, "test": test,
            "wall_s": sum(h["seconds"] for run in runs.values() for h in run.meta["history"])}


def batch_devices(batch_size: int, examples: int, what: str, devices: int | None) -> list:
    """The devices a run splits its batches over (:func:`experiments._parallel.run_devices`), after
    checking that a batch of ``batch_size`` fits the ``examples`` training examples (``what``: "images
    of FILE") and splits evenly over the devices."""
    from experiments._parallel import run_devices

    if batch_size > examples:
        raise UserError(f"--batch-size {batch_size} is more than the {examples} training {what}")
    chosen = run_devices(devices)
    if batch_size % len(chosen):
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {len(chosen)} devices")
    return chosen


def read_metrics(out: Path, part: str) -> dict | None:
    """The ``metrics.json`` of the training folder ``out`` (None where it has none, ``{}`` where it
    holds no object); :class:`UserError` where the other part's command wrote it."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    value = read_json(path, "the metrics.json of a training run")
    value = value if isinstance(value, dict) else {}
    other = value.get("part")
    if other not in (None, part):
        command = {"cnn": "python -m experiments.cnn", "p2g": "python -m experiments.p2g train"}[part]
        raise UserError(f"{out}: a {str(other).upper()} run, not a {part.upper()} one (expected a --out of {command})")
    return value


def write_metrics(out: Path, value: dict) -> None:
    """``out/metrics.json``, written atomically by process 0 only."""
    import jax

    if jax.process_index() == 0:
        write_json(out / "metrics.json", value, indent=1)


def checkpoint_folder(path: Path, part: str) -> Path:
    """The checkpoint folder evaluation reads for ``path``: that of a training --out (for the CNN,
    of the run its metrics.json selected), of a run folder, or a checkpoint folder itself."""
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    written = read_metrics(path, part)  # a one-line error where the other part's command wrote it
    if written is not None and written.get("part") is None:
        raise UserError(f"{path / 'metrics.json'} was written by an earlier version of this command; "
                        "train again into a new --out to evaluate with this version")
    if written and part == "cnn":
        checkpoint = written["selected"].get("checkpoint") if isinstance(written.get("selected"), dict) else None
        if not isinstance(checkpoint, str):
            raise UserError(f"{path / 'metrics.json'}: no selected run (expected the metrics.json of a finished "
                            "training run)")
        path = path / Path(checkpoint).parent.name  # lr_<lr>, wherever the run folder has moved
    folder = run_checkpoints(path)
    runs = sorted(d.name for d in path.glob("lr_*/") if d.is_dir())
    if folder is None and runs and part == "p2g":
        raise UserError(f"{path}: a CNN run, not a P2G one (expected a --out of python -m experiments.p2g train)")
    if folder is None and runs:  # a sweep's --out without metrics.json (stopped before the end): name its runs
        raise UserError(f"{path}: no metrics.json to say which run was selected; pass one of its runs "
                        f"({', '.join(str(path / r) for r in runs)})")
    if folder is None:
        raise UserError(f"{path}: no checkpoint here (expected a training --out, a run folder or its ckpt/ folder)")
    return folder
