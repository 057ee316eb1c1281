"""The training state, the optimiser step and the step loop both parts share.

A part supplies its loss, ``loss_fn(params, stats, batch, key) -> (loss, stats')``, and the host
batches of an epoch; one training step is then the same pure function for both
(:func:`train_step`):

    key = fold_in(fold_in(key(seed), epoch), step)              (common.batching)
    (loss, stats'), g = value_and_grad(loss_fn)(params, stats, batch, key)
    params <- optax update of params by g                       (lr injected: a leaf of the state)

and one epoch is :func:`run_epoch`, a jitted step per global batch with the losses kept on the
devices until the epoch ends. A learning-rate sweep stacks its members' states on a leading axis
(:func:`stack`) and ``jax.vmap``-s the same step over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from common.batching import epoch_key, step_key
from common.parallel import global_batch, put_replicated, to_host


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


def run_epoch(step: Callable, state, batches: Iterable[dict[str, np.ndarray]], epoch: int, sharding: NamedSharding,
              wait: bool = False, progress: Callable[[int], Any] | None = None):
    """Call ``step(state, batch, epoch) -> (state, loss)`` on each of ``batches`` (host dicts that
    every process holds in full) as global batches sharded by ``sharding``; returns (state, the
    mean of the losses over the batches, as a host array). ``wait``: block on each step (one step
    in flight, :func:`common.parallel.in_process_collectives`); ``progress`` is called with 1
    after each step."""
    epoch_ = put_replicated(sharding.mesh, np.int32(epoch))
    losses = []
    for batch in batches:
        state, loss = step(state, global_batch(sharding, batch), epoch_)
        if wait:
            loss.block_until_ready()
        losses.append(loss)
        if progress is not None:
            progress(1)
    return state, to_host(jnp.mean(jnp.stack(losses), axis=0))


def stack(states: list) -> Any:
    """L states -> one whose leaves have a leading axis of size L (the state of a vmapped sweep)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def member(state, i: int) -> Any:
    """Member ``i`` of a :func:`stack`-ed state."""
    return jax.tree.map(lambda leaf: leaf[i], state)
