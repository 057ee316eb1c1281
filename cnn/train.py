"""Pure, jit-compiled training and evaluation of :class:`cnn.model.CNN` with optax SGD.

The model is split once into a static graph and two array pytrees, ``params`` (``nnx.Param``)
and ``stats`` (``nnx.BatchStat``); every step is a pure function of ``TrainState`` arrays,
jit-compiled once, with the data resident on the device and the batch gathered inside the step:

    for each batch b:   (loss, stats'), g = value_and_grad(NLL(log_softmax(f(params, stats, x_b)), y_b))
                        params <- params - lr * g                     (optax.sgd)

Why one jitted call per step and not a ``lax.scan`` over the epoch: on XLA:CPU a conv training
step inside a while loop ran 6.5x slower (39 vs 263 images/s, baseline, batch 8, 2 cores;
``python -m benchmarks.cnn_step``, docs/performance.md), while the per-call dispatch costs well under 1% of a 30 ms step.

Batches are drawn from a per-epoch permutation seeded by (seed, epoch) and dropout keys by
(seed, epoch, step), so a run resumed from an epoch checkpoint repeats exactly what an
uninterrupted one would have done. The batch axis is sharded over the devices (data parallelism
through ``jax.sharding``, :func:`default_devices`); parameters are replicated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnn.model import CNN, NUM_CLASSES


def donated_state(devices) -> tuple[int, ...]:
    """``donate_argnums`` for the jitted steps: the state (argument 0) on accelerators, nothing on
    a CPU. Donating the state lets XLA write the new parameters over the old ones, but there
    XLA:CPU copied the baseline's 19 MB ``fc1`` kernel every step (a ``copy`` of it in the
    compiled step, gone without donation): the baseline CNN's step took 19.7 ms at batch 8 donated and
    17.2 without, 93.3 and 86.9 ms at batch 64; the BN variant's did not move
    (docs/performance.md, item 16)."""
    return () if devices[0].platform == "cpu" else (0,)


def default_devices() -> list:
    """All local accelerators; on a CPU, one device. XLA:CPU host devices (which
    :mod:`experiments.p2g` creates to use two cores) would sync this step's gradient through
    XLA:CPU's in-process all-reduce, which deadlocked here (docs/performance.md)."""
    devices = jax.local_devices()
    return devices if devices[0].platform != "cpu" else devices[:1]


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    stats: Any  # nnx.State of nnx.BatchStat (empty for the baseline)
    opt_state: Any  # optax state
    step: jax.Array  # () int32, steps taken since the start of training


def nll_loss(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood: -1/B sum_b log p(y_b | x_b). ``(B, C), (B,) -> ()``."""
    chex.assert_rank(log_probs, 2)
    chex.assert_rank(labels, 1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def pixels(images_u8: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 in [0, 1]."""
    return images_u8.astype(jnp.float32) / 255.0


class Trainer:
    """Holds what is static for a run (graphs, optimiser, mesh) and the jitted pure functions."""

    def __init__(self, batch_norm: bool, lr: float, batch_size: int, seed: int = 0, devices=None,
                 impl: str = "reference", pool: str = "average"):
        devices = list(devices if devices is not None else default_devices())
        if batch_size % len(devices):
            raise ValueError(f"batch size {batch_size} must be a multiple of the {len(devices)} devices")
        self.batch_norm, self.lr, self.batch_size, self.seed, self.impl = batch_norm, lr, batch_size, seed, impl
        self.mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.tx = optax.sgd(lr)
        model = CNN(batch_norm, rngs=nnx.Rngs(params=seed), impl=impl, pool=pool)
        model.train()
        self.train_graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        model.eval()
        self.eval_graph, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
        self._init = (params, stats)
        self.donate = donated_state(devices)  # the jitted steps' donate_argnums, SweepTrainer's too
        self._train_step = jax.jit(self._train_step_impl, donate_argnums=self.donate)
        self._evaluate = jax.jit(self._evaluate_impl, static_argnames="batch")

    # -- state -------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        params, stats = self._init
        state = TrainState(params, stats, self.tx.init(params), jnp.int32(0))
        return jax.device_put(state, self.replicated)

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self.init_state)

    def model(self, state: TrainState, train: bool = False) -> CNN:
        """A live NNX model holding ``state``'s arrays (eval mode unless ``train``)."""
        return nnx.merge(self.train_graph if train else self.eval_graph, state.params, state.stats)

    # -- training ----------------------------------------------------------------------------

    def _loss(self, params, stats, images, labels, key):
        model = nnx.merge(self.train_graph, params, stats, copy=True)
        log_probs = model(pixels(images), rngs=nnx.Rngs(dropout=key))
        return nll_loss(log_probs, labels), nnx.state(model, nnx.BatchStat)

    def _train_step_impl(self, state: TrainState, images, labels, index, epoch_key, lr=None):
        """One SGD step on the rows ``index`` (B,) of the resident data -> (state, loss).
        ``lr`` (a traced scalar) overrides the trainer's learning rate (:class:`SweepTrainer`)."""
        x = jax.lax.with_sharding_constraint(images[index], self.batch_sharding)
        y = jax.lax.with_sharding_constraint(labels[index], self.batch_sharding)
        key = jax.random.fold_in(epoch_key, state.step)
        (loss, stats), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, state.stats, x, y, key)
        tx = self.tx if lr is None else optax.sgd(lr)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, stats, opt_state, state.step + 1), loss

    def epoch_batches(self, n: int, epoch: int) -> np.ndarray:
        """(ceil(n / B), B) example indices for ``epoch``: a seeded permutation, the last batch
        completed with the permutation's first examples (every example is seen at least once)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        steps = -(-n // self.batch_size)
        return np.concatenate([perm, perm[: steps * self.batch_size - n]]).reshape(steps, self.batch_size)

    def epoch_key(self, epoch: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), epoch)

    def train_epoch(self, state, images, labels, epoch: int, progress=None):
        """One epoch of jitted steps; returns (state, mean training loss over its batches).

        ``images``/``labels`` should already be on the device (:meth:`put`). ``progress`` is
        called with 1 after each step. Losses stay on the device until the epoch ends, so the
        host never waits on a step.
        """
        state, losses = self.run_epoch(self._train_step, state, images, labels, epoch, progress)
        return state, float(losses)

    def run_epoch(self, step, state, images, labels, epoch: int, progress=None, *extra):
        """Call ``step(state, images, labels, index, epoch_key, *extra) -> (state, loss)`` on
        each batch of ``epoch``; returns (state, the mean of the losses over the batches)."""
        batches = self.epoch_batches(len(labels), epoch).astype(np.int32)
        key = self.epoch_key(epoch)
        losses = []
        for index in batches:
            state, loss = step(state, images, labels, index, key, *extra)
            losses.append(loss)
            if progress is not None:
                progress(1)
        return state, jnp.mean(jnp.stack(losses), axis=0)

    def put(self, array: np.ndarray) -> jax.Array:
        """Place a host array on the devices, replicated (the data set is small)."""
        return jax.device_put(array, self.replicated)

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate_impl(self, params, stats, images, labels, batch: int):
        """Scan over fixed-size batches; the last one padded and masked. -> (predictions (n,), mean NLL)."""
        n = labels.shape[0]
        steps = -(-n // batch)
        index = jnp.arange(steps * batch) % n
        valid = (jnp.arange(steps * batch) < n).reshape(steps, batch)
        model = nnx.merge(self.eval_graph, params, stats)

        def step(total, xs):
            idx, mask = xs
            log_probs = model(pixels(images[idx]))
            nll = -jnp.take_along_axis(log_probs, labels[idx][:, None], axis=1)[:, 0]
            return total + jnp.sum(jnp.where(mask, nll, 0.0)), jnp.argmax(log_probs, axis=1)

        total, preds = jax.lax.scan(step, jnp.float32(0), (index.reshape(steps, batch), valid))
        return preds.reshape(-1)[:n], total / n

    def evaluate(self, state: TrainState, images, labels, batch: int = 250) -> dict:
        """Accuracy, mean NLL and predictions on resident data."""
        preds, loss = self._evaluate(state.params, state.stats, images, labels, batch=batch)
        preds = np.asarray(preds)
        return {"acc": float(np.mean(preds == np.asarray(labels))), "loss": float(loss), "preds": preds}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


class SweepTrainer:
    """Several learning rates trained as one program: the :class:`Trainer` step ``jax.vmap``-ed
    over a leading learning-rate axis of the state, every member seeing the same batches and
    dropout keys as its own :class:`Trainer` would (same seed, same initial parameters), so a
    member's trajectory is the one its sequential run takes, up to floating-point reassociation.
    ``members[i]`` is the plain trainer of ``lrs[i]`` (evaluation, checkpoint shapes).
    """

    def __init__(self, batch_norm: bool, lrs, batch_size: int, seed: int = 0, devices=None, impl: str = "reference",
                 pool: str = "average"):
        self.lrs = tuple(float(lr) for lr in lrs)
        self.members = [Trainer(batch_norm, lr, batch_size, seed, devices, impl, pool) for lr in self.lrs]
        lead = self.members[0]
        self.replicated = lead.replicated
        step = jax.vmap(lead._train_step_impl, in_axes=(0, None, None, None, None, 0))
        self._train_step = jax.jit(step, donate_argnums=lead.donate)
        self._lrs = jax.device_put(jnp.asarray(self.lrs, jnp.float32), self.replicated)

    @staticmethod
    def stack(states: list[TrainState]) -> TrainState:
        """L member states -> one state whose leaves have a leading axis of size L."""
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    @staticmethod
    def member(state: TrainState, i: int) -> TrainState:
        return jax.tree.map(lambda leaf: leaf[i], state)

    def train_epoch(self, state: TrainState, images, labels, epoch: int, progress=None):
        """One epoch for every member at once -> (state, (L,) mean training losses)."""
        state, losses = self.members[0].run_epoch(self._train_step, state, images, labels, epoch, progress, self._lrs)
        return state, np.asarray(losses)
