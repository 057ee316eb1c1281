"""The training core both CLIs share: the epoch loop over a trainer's jitted steps, validation,
latest and best checkpoints, exact resume with the config check, divergence, history, progress
and the ``metrics.json`` every run writes (devices and processes: :mod:`experiments._parallel`).

A part provides a trainer (``init_state``, ``abstract_state`` and an epoch function) and a
validation function; this module does the rest the same way for both. One run is one folder with
one checkpoint folder, ``ckpt/`` (:mod:`experiments._checkpoint`). Epochs are 0-based in the loop,
1-based in the records (``epoch``, ``best_epoch``); epoch ``e`` (1-based) is checkpoint step ``e - 1``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from experiments._checkpoint import Checkpoints, run_checkpoints
from experiments._cli import UserError, read_json, write_json


RECORDED_ONLY = {"data"}  # where the data came from: kept, not compared (its fingerprints say whether it is the same)


class Run:
    """One training run in ``directory``: its checkpoints and ``meta`` (config, per-epoch history,
    best epoch and value of ``metric``, divergence), resumed from ``ckpt/`` when present.

    ``config`` is everything that determines the run's numbers (data fingerprints included): a
    folder holding a run with another config is a :class:`UserError`, as is one holding more
    epochs than ``epochs``. ``kind`` names the CLI (a checkpoint of another kind is refused before
    its arrays are read). ``metric`` is the validation record's key that selects the best epoch,
    higher better when ``maximize``.
    """

    def __init__(self, directory: Path, config: dict, trainer, *, kind: str, epochs: int, metric: str,
                 maximize: bool, log: Callable[[str], None], label: str = ""):
        self.directory, self.epochs, self.metric, self.maximize, self.log = Path(directory), epochs, metric, maximize, log
        self.label = label  # prefix of this run's log lines ("lr=0.01 ")
        config = {"kind": kind, **config}
        self.meta = self._fresh = {"config": config, "history": [], "diverged": False, "best_epoch": None,
                                   f"best_{metric}": None}
        run_checkpoints(self.directory)  # refuses a folder of the earlier layout
        self.checkpoints = Checkpoints(self.directory / "ckpt", lock=True)
        self.trainer = trainer  # its init_state() and abstract_state() give the state's shapes
        self.state = trainer.init_state()

        def check(meta: dict) -> None:
            saved = meta.get("config", {})
            if saved.get("kind") != kind:
                raise UserError(f"{self.directory} holds a checkpoint that is not a {kind} run of this version "
                                "(expected one written by this command); choose another --out")
            differ = sorted(k for k in (config.keys() | saved.keys()) - RECORDED_ONLY if config.get(k) != saved.get(k))
            if differ:
                shown = ", ".join(f"{k}: {_short(saved.get(k))} there, {_short(config.get(k))} now" for k in differ)
                raise UserError(f"{self.directory} holds a run with other settings or data ({shown}); choose another --out")
            if len(meta["history"]) > epochs:
                raise UserError(f"{self.directory} holds {len(meta['history'])} epochs, more than --epochs {epochs}; "
                                "choose another --out or at least as many epochs")

        resumed = self.checkpoints.resume(trainer.abstract_state(), check, log)
        if resumed is not None:
            _, self.state, self.meta = resumed
            log(f"{self.label}resuming after epoch {self.epochs_done}")

    @property
    def epochs_done(self) -> int:
        return len(self.meta["history"])

    @property
    def finished(self) -> bool:
        return self.meta["diverged"] or self.epochs_done >= self.epochs

    @property
    def best(self) -> float | None:
        """The best epoch's value of ``metric`` (None before the first finite epoch)."""
        return self.meta[f"best_{self.metric}"]

    def improves(self, value: float) -> bool:
        return self.best is None or (value > self.best if self.maximize else value < self.best)

    def rewind(self, epochs: int) -> None:
        """Go back to the end of epoch ``epochs`` (<= :attr:`epochs_done`; the checkpoint of the epoch
        before the last is kept for this), e.g. to line up the runs of a vmapped sweep."""
        if epochs == self.epochs_done:
            return
        if epochs == 0:
            self.state, self.meta = self.trainer.init_state(), dict(self._fresh, history=[])
        else:
            self.state, self.meta = self.checkpoints.restore(self.trainer.abstract_state(), epochs - 1)
        self.log(f"{self.label}going back to epoch {epochs}, where the other runs stopped")

    def end_epoch(self, epoch: int, state, train_loss: float, seconds: float, validate: Callable[[Any], dict]) -> dict:
        """Validate (``validate(state)`` -> the record's ``val_*`` entries), record, checkpoint and
        log finished epoch ``epoch`` (0-based). A non-finite training loss, or validation metric,
        marks the run diverged and ends it: a NaN is reported, never trained on or selected."""
        self.state = state
        finite = math.isfinite(train_loss)
        # a diverged epoch keeps the record's shape: the previous record's validation keys, None
        keys = [k for k in (self.meta["history"][-1] if self.meta["history"] else {self.metric: None})
                if k not in ("epoch", "train_loss", "seconds")]
        val = validate(state) if finite else dict.fromkeys(keys)
        finite = finite and val.get(self.metric) is not None and math.isfinite(val[self.metric])
        record = {"epoch": epoch + 1, "train_loss": train_loss if math.isfinite(train_loss) else None,
                  **{k: (v if v is None or math.isfinite(v) else None) for k, v in val.items()}, "seconds": seconds}
        self.meta["history"].append(record)
        improved = finite and self.improves(record[self.metric])
        if improved:
            self.meta["best_epoch"], self.meta[f"best_{self.metric}"] = epoch + 1, record[self.metric]
        if not finite:
            self.meta["diverged"] = True
        score = record[self.metric] * (1 if self.maximize else -1) if finite else None
        self.checkpoints.save(epoch, state, self.meta, score)
        if not finite:
            self.log(f"{self.label}epoch {epoch + 1}: training loss {train_loss}, {self.metric} "
                     f"{val.get(self.metric)}; this run diverged, stopping it")
            return record
        shown = "  ".join(f"{_name(k)} {v:.4f}" for k, v in record.items()
                          if k not in ("epoch", "seconds") and v is not None)
        self.log(f"{self.label}epoch {epoch + 1:>2}/{self.epochs}: {shown}  ({seconds:.1f} s)")
        return record

    def summary(self) -> str:
        """One line: the best epoch and value, and divergence."""
        if self.meta["diverged"] and self.meta["best_epoch"] is None:
            return f"{self.label}diverged"
        note = " (then diverged)" if self.meta["diverged"] else ""
        return f"{self.label}best {self.metric.replace('_', ' ')} {self.best:.4f} at epoch {self.meta['best_epoch']}{note}"

    def close(self) -> None:
        self.checkpoints.close()


def _name(key: str) -> str:
    """A record key as the log shows it: val_cer -> val CER."""
    return " ".join(word.upper() if word in ("cer", "wer") else word for word in key.split("_"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def progress_bar(total: int, desc: str):
    """A tqdm bar on process 0's terminal (none when the output is not a terminal)."""
    import jax
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None if jax.process_index() == 0 else True)


def fit(runs: list[Run], train_epoch: Callable, validate: Callable[[Any], dict], steps: int) -> None:
    """The epoch loop: train the unfinished ``runs`` together from their first missing epoch to
    their last, with a progress bar of ``steps`` steps an epoch, then :meth:`Run.end_epoch` for
    each. One run: ``train_epoch(state, epoch, progress) -> (state, mean training loss)``; several
    (a vmapped sweep): the same over their stacked states (:func:`common.training.stack`) with (L,)
    losses, a member that diverges carried along, ignored, and runs that stopped at different
    epochs (killed between two members' saves) rewound to the latest epoch all reached. Each
    record's ``seconds`` is the epoch's time shared out among the runs trained in it."""
    from common.training import member, stack

    runs = [run for run in runs if not run.finished]
    if not runs:
        return
    start = min(run.epochs_done for run in runs)
    for run in runs:
        run.rewind(start)
    together = len(runs) > 1
    state = stack([run.state for run in runs]) if together else runs[0].state
    for epoch in range(start, runs[0].epochs):
        live = [k for k, run in enumerate(runs) if not run.finished]
        if not live:
            break
        tick = time.perf_counter()
        with progress_bar(steps, f"{'lr sweep ' if together else runs[0].label}epoch {epoch + 1}/{runs[0].epochs}") as bar:
            state, losses = train_epoch(state, epoch, bar.update)
        seconds = (time.perf_counter() - tick) / len(live)
        for k in live:
            runs[k].end_epoch(epoch, member(state, k) if together else state, float(np.atleast_1d(losses)[k]),
                              seconds, validate)


def select(runs: dict[str, Run]) -> str | None:
    """The name of the run with the best validation value (None when every run diverged first)."""
    finished = {name: run for name, run in runs.items() if run.best is not None}
    if not finished:
        return None
    sign = 1 if next(iter(finished.values())).maximize else -1
    return max(finished, key=lambda name: sign * finished[name].best)


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


def read_best(directory: Path, check_meta: Callable[[dict], None], make_trainer: Callable[[dict], Any]):
    """``(trainer, state, meta)`` of the best epoch in the checkpoint folder ``directory``, read only:
    ``check_meta`` sees its meta first (raising where another kind of run wrote it), and
    ``make_trainer(its config)`` builds the trainer whose state shapes it restores into."""
    with Checkpoints(directory, read_only=True) as saved:
        step = saved.best_step()
        if step is None:
            raise UserError(f"{saved.directory}: no validated epoch to evaluate (the run diverged first)")
        meta = saved.read_meta(step)
        check_meta(meta)
        trainer = make_trainer(meta["config"])
        return (trainer, *saved.restore(trainer.abstract_state(), step))


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


def fingerprint(*arrays: Iterable) -> str:
    """A short SHA-1 of the arrays' bytes (or strings): a resumed run must see the same data."""
    digest = hashlib.sha1()
    for array in arrays:
        if isinstance(array, np.ndarray):
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        else:
            for item in array:
                digest.update(repr(item).encode())
    return digest.hexdigest()[:16]
