"""The training state, the optimiser step and the step loop both parts share.

A part supplies its loss, ``loss_fn(params, stats, batch, key) -> (loss, stats')``, and how a
batch is gathered from its training data held on the devices; one training step is then the same
pure function for both (:func:`train_step`):

    key = fold_in(fold_in(key(seed), epoch), step)              (common.batching)
    (loss, stats'), g = value_and_grad(loss_fn)(params, stats, batch, key)
    params <- optax update of params by g                       (lr injected: a leaf of the state)

One dispatch runs a block of K steps (:func:`block_step`: a ``lax.scan`` over K rows of example
indices, each batch gathered on the devices), and one epoch is :func:`run_epoch`: the epoch's
indices, computed on the host and placed on the devices once, cut into blocks of K
(:func:`blocks`), one jitted call per block with nothing sent from the host, the losses kept on
the devices until the epoch ends. K changes only speed: the batches, dropout
keys and step count are those of K = 1. A learning-rate sweep stacks its members' states on a
leading axis (:func:`stack`) and ``jax.vmap``-s the same step over it.

Around them, the epoch loop both command lines share (:func:`fit`): a :class:`Run` is one training
run's folder, its checkpoints (:mod:`common.checkpoint`), resume with the check that the folder
holds the same run, validation, the best epoch, divergence and the per-epoch history. Epochs are
0-based in the loop, 1-based in the records (``epoch``, ``best_epoch``); epoch ``e`` (1-based) is
checkpoint step ``e - 1``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from common.batching import epoch_key, step_key
from common.checkpoint import CheckpointError, Checkpoints, run_checkpoints
from common.parallel import global_indices, put_replicated, to_host


class TrainState(NamedTuple):
    """What a training run carries from step to step (and saves every epoch)."""

    params: Any  # nnx.State of nnx.Param
    stats: Any  # nnx.State of nnx.BatchStat (empty for models without BatchNorm)
    opt_state: Any  # optax.inject_hyperparams state: the learning rate is a leaf
    step: jax.Array  # () int32, steps taken since the start of training


def init_state(params, stats, tx: optax.GradientTransformation, sharding: NamedSharding) -> TrainState:
    """The state before the first step, replicated by ``sharding``."""
    return jax.device_put(TrainState(params, stats, tx.init(params), jnp.int32(0)), sharding)


def abstract_state(init: Callable[[], TrainState], sharding: NamedSharding) -> TrainState:
    """Shapes, dtypes and shardings of ``init()`` (what orbax restores into, on this run's mesh,
    whatever mesh wrote the checkpoint)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(init))


def train_step(loss_fn: Callable, tx: optax.GradientTransformation, seed: int) -> Callable:
    """``step(state, batch, epoch) -> (state, loss)``: one optimiser step (pure, for ``jax.jit``)
    on ``batch`` (a dict of arrays) of ``epoch`` (a () int32), its dropout key a function of
    (seed, epoch, step) alone."""
    def step(state: TrainState, batch: dict, epoch) -> tuple[TrainState, jax.Array]:
        key = step_key(epoch_key(seed, epoch), state.step)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.stats, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), stats, opt_state, state.step + 1), loss

    return step


def block_step(step: Callable, gather: Callable, sharding: NamedSharding) -> Callable:
    """``block(leaves, data, indices, epoch, start, treedef, steps, shape) -> (leaves, losses,
    start + steps)``: ``step(state, batch, epoch) -> (state, loss)`` on rows ``start``..``start +
    steps - 1`` of ``indices`` (N, B), the epoch's example indices on the devices, in turn: a
    ``lax.scan`` over K = ``steps`` rows (for K = 1 the step alone, which keeps XLA:CPU's fast
    paths of a step outside a loop). Pure, for ``jax.jit`` with ``treedef``, ``steps`` and
    ``shape`` static. The state goes in and out as its ``jax.tree.flatten`` leaves (a list, which
    jit's dispatch reads without calling back into Python, unlike NNX's state nodes) of
    ``treedef``; ``start`` is a () int32 on the devices, returned advanced so that the host never
    sends a block's position. ``losses`` is (K, ...) of the steps' losses. The batch of a row is
    ``gather(data, index, shape)`` (data: the training arrays on the devices; index: (B,); shape:
    the static widths a part needs, or None) constrained to ``sharding``, so that each device
    gathers only its own rows."""
    def one(state, data, index, epoch, shape):
        batch = jax.lax.with_sharding_constraint(gather(data, index, shape), sharding)
        return step(state, batch, epoch)

    def block(leaves, data, indices: jax.Array, epoch, start: jax.Array, treedef, steps: int, shape=None):
        state = jax.tree.unflatten(treedef, leaves)
        rows = jax.lax.dynamic_slice_in_dim(indices, start, steps, axis=0)
        if steps == 1:
            state, loss = one(state, data, rows[0], epoch, shape)
            losses = loss[None]
        else:
            state, losses = jax.lax.scan(lambda state, index: one(state, data, index, epoch, shape), state, rows)
        return jax.tree.leaves(state), losses, start + steps

    return block


def jit_block(block: Callable, sharding: NamedSharding, donate: tuple[int, ...] = ()) -> Callable:
    """``jax.jit`` of a :func:`block_step` (``treedef``, ``steps`` and ``shape`` static, outputs
    replicated by ``sharding``, the state donated where ``donate`` is ``(0,)``)."""
    return jax.jit(block, static_argnames=("treedef", "steps", "shape"), donate_argnums=donate, out_shardings=sharding)


def blocks(indices: np.ndarray, steps_per_call: int) -> Iterator[np.ndarray]:
    """An epoch's (steps, B) example indices as consecutive blocks of ``steps_per_call`` (K) rows,
    the last one shorter where K does not divide the steps. Raises ``ValueError`` for K < 1."""
    if steps_per_call < 1:
        raise ValueError(f"steps per call must be at least 1, got {steps_per_call}")
    for start in range(0, len(indices), steps_per_call):
        yield indices[start:start + steps_per_call]


def steps_per_call(requested: int | None, steps: int, platform: str, cpu_default: int) -> int:
    """The K of an epoch of ``steps`` steps: ``requested``, or by default the whole epoch on an
    accelerator (the host then dispatches once an epoch) and ``cpu_default`` on a CPU (each
    part's measured choice); never more than ``steps``."""
    if requested is None:
        requested = cpu_default if platform == "cpu" else steps
    return max(1, min(requested, steps))


@dataclass(frozen=True)
class Trace:
    """A ``jax.profiler`` trace into ``directory`` of epoch ``epoch``'s first blocks: the ``skip``
    first blocks left out (to leave a compilation out of it), then blocks until at least ``steps``
    steps are traced. Open it with TensorBoard's profile plugin or Perfetto (README)."""

    directory: str
    epoch: int
    skip: int = 0
    steps: int = 20

    @classmethod
    def after_compilation(cls, directory, first: int, epochs: int, steps: int = 20) -> Trace:
        """The trace of a run that trains epochs ``first``..``epochs - 1``: the first blocks of its
        second epoch (its blocks' programs compiled in the first), or of its only epoch after the
        first block; in a multi-process run each process's under ``directory/process_<i>``."""
        if jax.process_count() > 1:
            directory = f"{directory}/process_{jax.process_index()}"
        second = first + 1 < epochs
        return cls(str(directory), first + 1 if second else first, 0 if second else 1, steps)


def run_epoch(block: Callable, state, data, indices: np.ndarray, epoch: int, sharding: NamedSharding,
              steps_per_call: int = 1, shape: Callable[[np.ndarray], Any] | None = None, wait: bool = False,
              progress: Callable[[int], Any] | None = None, trace: Trace | None = None):
    """One epoch: ``block`` (a jitted :func:`block_step`) called on each block of K =
    ``steps_per_call`` rows of ``indices`` (N, B), the epoch's example indices, which every
    process holds in full on the host and which are placed once (each process sending only the
    columns of its own devices, split by ``sharding``); returns (state, the mean of all N steps'
    losses, as a host array). ``data``: the training arrays already on the devices; ``shape(rows)``:
    the static shape argument of a block of host rows (K, B) (None: none). ``wait``: block on
    each call (one call in flight, :func:`common.parallel.in_process_collectives`); ``progress``
    is called with K after each call; ``trace``: profile some of the blocks of its epoch
    (:class:`Trace`). Raises ``ValueError`` for K < 1."""
    epoch_, start = put_replicated(sharding.mesh, (np.int32(epoch), np.int32(0)))
    placed = global_indices(sharding, indices)
    leaves, treedef = jax.tree.flatten(state)
    losses, tracing, traced = [], False, 0
    try:
        for number, rows in enumerate(blocks(indices, steps_per_call)):
            if trace is not None and trace.epoch == epoch and number == trace.skip:
                jax.block_until_ready(leaves)  # the trace starts with no earlier block in flight
                jax.profiler.start_trace(trace.directory)
                tracing = True
            leaves, loss, start = block(leaves, data, placed, epoch_, start, treedef=treedef, steps=len(rows),
                                        shape=None if shape is None else shape(rows))
            if wait:
                loss.block_until_ready()
            losses.append(loss)
            traced += len(rows) if tracing else 0
            if tracing and traced >= trace.steps:
                jax.block_until_ready(leaves)  # the traced blocks' device work ends inside the trace
                jax.profiler.stop_trace()
                tracing = False
            if progress is not None:
                progress(len(rows))
    finally:
        if tracing:  # the epoch ended, or failed, before the trace had its steps
            jax.block_until_ready(leaves)
            jax.profiler.stop_trace()
    return jax.tree.unflatten(treedef, leaves), to_host(jnp.mean(jnp.concatenate(losses), axis=0))


def stack(states: list) -> Any:
    """L states -> one whose leaves have a leading axis of size L (the state of a vmapped sweep)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def member(state, i: int) -> Any:
    """Member ``i`` of a :func:`stack`-ed state."""
    return jax.tree.map(lambda leaf: leaf[i], state)


class OtherRun(Exception):
    """A run folder holding another run: another kind, or other settings or data (``differ``: the
    names of the settings that differ). Not a :class:`CheckpointError`: the folder is sound, and
    resuming must stop here rather than skip its steps as unreadable."""

    def __init__(self, directory: Path, reason: str, differ: tuple[str, ...] = ()):
        super().__init__(f"{directory}: {reason}")
        self.directory, self.differ = directory, tuple(differ)


class MoreEpochs(OtherRun):
    """A run folder holding more epochs than the run asks for."""


RECORDED_ONLY = {"data"}  # where the data came from: kept, not compared (its fingerprints say whether it is the same)


class Run:
    """One training run in ``directory``: its checkpoints and ``meta`` (config, per-epoch history,
    best epoch and value of ``metric``, divergence), resumed from ``ckpt/`` when present.

    ``config`` is everything that determines the run's numbers (data fingerprints included): a
    folder holding a run with another config raises :class:`OtherRun`, one holding more epochs than
    ``epochs`` :class:`MoreEpochs`. ``kind`` names the CLI (a checkpoint of another kind is refused before
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
                raise OtherRun(self.directory, f"holds a checkpoint that is not a {kind} run of this version")
            differ = sorted(k for k in (config.keys() | saved.keys()) - RECORDED_ONLY if config.get(k) != saved.get(k))
            if differ:
                shown = ", ".join(f"{k}: {_short(saved.get(k))} there, {_short(config.get(k))} now" for k in differ)
                raise OtherRun(self.directory, f"holds a run with other settings or data ({shown})", differ)
            if len(meta["history"]) > epochs:
                raise MoreEpochs(self.directory, f"holds {len(meta['history'])} epochs, more than the {epochs} asked")

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

    def saved_state(self, step: int | None = None):
        """The state saved at checkpoint ``step`` (default: the best epoch's)."""
        step = self.checkpoints.best_step() if step is None else step
        return self.checkpoints.restore(self.trainer.abstract_state(), step)[0]

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


def fit(runs: list[Run], train_epoch: Callable, validate: Callable[[Any], dict], steps: int,
        profile: str | Path | None = None) -> None:
    """The epoch loop: train the unfinished ``runs`` together from their first missing epoch to
    their last, with a progress bar of ``steps`` steps an epoch, then :meth:`Run.end_epoch` for
    each. One run: ``train_epoch(state, epoch, progress) -> (state, mean training loss)``; several
    (a vmapped sweep): the same over their stacked states (:func:`common.training.stack`) with (L,)
    losses, a member that diverges carried along, ignored, and runs that stopped at different
    epochs (killed between two members' saves) rewound to the latest epoch all reached. Each
    record's ``seconds`` is the epoch's time shared out among the runs trained in it. ``profile``:
    a folder for a :class:`Trace` of a few steps after compilation (through the first run's
    trainer, whose epochs a sweep's run)."""
    if profile is not None and all(run.finished for run in runs):
        runs[0].log(f"profile: nothing left to train, so no trace under {profile}")
    runs = [run for run in runs if not run.finished]
    if not runs:
        return
    start = min(run.epochs_done for run in runs)
    for run in runs:
        run.rewind(start)
    if profile is not None:
        runs[0].trainer.trace = Trace.after_compilation(profile, start, runs[0].epochs)
        runs[0].log(f"profile: a jax.profiler trace of epoch {runs[0].trainer.trace.epoch + 1} under {profile}")
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


def read_best(directory: Path, kind: str, make_trainer: Callable[[dict], Any]):
    """``(trainer, state, meta)`` of the best epoch in the checkpoint folder ``directory``, read only,
    where a :class:`Run` of ``kind`` wrote it (:class:`CheckpointError` otherwise, before any array
    is read); ``make_trainer(its config)`` builds the trainer whose state shapes it restores into."""
    with Checkpoints(directory, read_only=True) as saved:
        step = saved.best_step()
        if step is None:
            raise CheckpointError(saved.directory, "no validated epoch to evaluate (the run diverged first)")
        meta = saved.read_meta(step)
        other = meta.get("config", {}).get("kind")
        if other != kind:
            raise CheckpointError(saved.directory, f"not a {kind.upper()} checkpoint" + (f" (a {other} run's)" if other else ""))
        trainer = make_trainer(meta["config"])
        return (trainer, *saved.restore(trainer.abstract_state(), step))


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
