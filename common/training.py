"""The training state, the optimiser step and the step loop both parts share.

A part supplies its loss, ``loss_fn(params, stats, batch, key) -> (loss, stats')``, and how a
batch is gathered from its training data held on the devices; one training step is then the same
pure function for both (:func:`train_step`):

    key = fold_in(fold_in(key(seed), epoch), step)              (common.batching)
    (loss, stats'), g = value_and_grad(loss_fn)(params, stats, batch, key)
    params <- optax update of params by g                       (lr injected: a leaf of the state)

One dispatch runs a block of K steps (:func:`block_step`: a ``lax.scan`` over K rows of example
indices, each batch gathered on the devices), and one epoch is :func:`run_epoch`: the epoch's
indices, computed on the host, cut into blocks of K (:func:`blocks`), one jitted call per block,
the losses kept on the devices until the epoch ends. K changes only speed: the batches, dropout
keys and step count are those of K = 1. A learning-rate sweep stacks its members' states on a
leading axis (:func:`stack`) and ``jax.vmap``-s the same step over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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
    """``block(state, data, indices, epoch, shape) -> (state, losses)``: ``step(state, batch, epoch)
    -> (state, loss)`` (pure, for ``jax.jit`` with ``shape`` static) on each row of ``indices``
    (K, B) in turn, a ``lax.scan`` over K (for K = 1 the step alone, which keeps XLA:CPU's fast
    paths of a step outside a loop); ``losses`` is (K, ...) of the steps' losses. The batch of a
    row is ``gather(data, index, shape)`` (data: the training arrays on the devices; index: (B,);
    shape: the static widths a part needs, or None) constrained to ``sharding``, so that each
    device gathers only its own rows."""
    def one(state, data, index, epoch, shape):
        batch = jax.lax.with_sharding_constraint(gather(data, index, shape), sharding)
        return step(state, batch, epoch)

    def block(state, data, indices: jax.Array, epoch, shape=None):
        if indices.shape[0] == 1:
            state, loss = one(state, data, indices[0], epoch, shape)
            return state, loss[None]
        return jax.lax.scan(lambda state, index: one(state, data, index, epoch, shape), state, indices)

    return block


def jit_block(block: Callable, sharding: NamedSharding, donate: tuple[int, ...] = ()) -> Callable:
    """``jax.jit`` of a :func:`block_step` (``shape`` static, outputs replicated by ``sharding``,
    the state donated where ``donate`` is ``(0,)``)."""
    return jax.jit(block, static_argnames="shape", donate_argnums=donate, out_shardings=sharding)


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


def run_epoch(block: Callable, state, data, batches: Iterable[tuple[np.ndarray, Any]], epoch: int,
              sharding: NamedSharding, wait: bool = False, progress: Callable[[int], Any] | None = None,
              trace: Trace | None = None):
    """Call ``block(state, data, indices, epoch, shape) -> (state, losses)`` (a jitted
    :func:`block_step`) on each (indices (K, B), shape) of ``batches`` (host indices that every
    process holds in full: each process places only the columns of its own devices, sharded by
    ``sharding``); returns (state, the mean of all the steps' losses, as a host array). ``data``:
    the training arrays already on the devices. ``wait``: block on each call (one call in flight,
    :func:`common.parallel.in_process_collectives`); ``progress`` is called with K after each call;
    ``trace``: profile some of the blocks of its epoch (:class:`Trace`)."""
    epoch_ = put_replicated(sharding.mesh, np.int32(epoch))
    losses, tracing, traced = [], False, 0
    try:
        for number, (indices, shape) in enumerate(batches):
            if trace is not None and trace.epoch == epoch and number == trace.skip:
                jax.block_until_ready(state)  # the trace starts with no earlier block in flight
                jax.profiler.start_trace(trace.directory)
                tracing = True
            state, loss = block(state, data, global_indices(sharding, indices), epoch_, shape)
            if wait:
                loss.block_until_ready()
            losses.append(loss)
            traced += len(indices) if tracing else 0
            if tracing and traced >= trace.steps:
                jax.block_until_ready(state)  # the traced blocks' device work ends inside the trace
                jax.profiler.stop_trace()
                tracing = False
            if progress is not None:
                progress(len(indices))
    finally:
        if tracing:  # the epoch ended, or failed, before the trace had its steps
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
    return state, to_host(jnp.mean(jnp.concatenate(losses), axis=0))


def stack(states: list) -> Any:
    """L states -> one whose leaves have a leading axis of size L (the state of a vmapped sweep)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def member(state, i: int) -> Any:
    """Member ``i`` of a :func:`stack`-ed state."""
    return jax.tree.map(lambda leaf: leaf[i], state)
