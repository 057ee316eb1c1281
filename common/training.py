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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from common.batching import epoch_key, step_key
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
