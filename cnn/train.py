"""Pure, jit-compiled training and evaluation of :class:`cnn.model.CNN` with optax SGD.

The model is split once into a static graph and two array pytrees, ``params`` (``nnx.Param``)
and ``stats`` (``nnx.BatchStat``); a training step is one jitted pure function of
(``TrainState``, global batch, epoch) over a batch sharded along the ``data`` mesh axis
(:mod:`common.parallel`; parameters replicated, BatchNorm statistics over the global batch):

    (loss, stats'), g = value_and_grad(NLL(log_softmax(f(params, stats, x_b)), y_b))
    params <- params - lr * g                    (optax.sgd, lr injected: a leaf of the state)

That is the homework's recipe and the default; beyond it (``--config best``) the images are
augmented inside the step (:mod:`cnn.augment`), the loss smooths its labels and the update is
:class:`common.optim.Optimizer`'s (momentum, weight decay, a schedule).

The training images stay on the devices (replicated: every device holds the whole training set,
small at 48x48 pixels; each process places it from its own full copy) and each dispatch runs K
steps, a ``lax.scan`` over K batches gathered on the devices (:func:`common.training.block_step`),
by default the whole epoch on an accelerator and :data:`CPU_STEPS_PER_CALL` on a CPU, where a
convolutional step inside a while loop loses XLA:CPU's fast paths (docs/performance.md). Batches
and dropout keys are functions of (seed, epoch, step) (:mod:`common.batching`), so a resumed run,
one with another K, or one split over any number of devices or processes, repeats an
uninterrupted one-device run.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnn.augment import augment
from cnn.model import CNN, NUM_CLASSES
from common.batching import epoch_batches
from common.optim import Optimizer
from common.parallel import batch_sharding, data_mesh, default_devices, in_process_collectives, put_replicated, replicated, to_host
from common.precision import compute_dtype
from common.training import (TrainState, abstract_state, block_step, init_state, jit_block, member, run_epoch,
                             stack, steps_per_call, train_step)

# K of a CPU run (--steps-per-call's default there): a step in a loop loses XLA:CPU's fast paths
# for convolutions, so one step a dispatch (docs/performance.md).
CPU_STEPS_PER_CALL = 1


def donated_state(devices) -> tuple[int, ...]:
    """``donate_argnums`` for the jitted steps: the state (argument 0) on accelerators, nothing on
    a CPU, where XLA:CPU copied the baseline's 19 MB ``fc1`` kernel every step when it was donated
    (docs/performance.md)."""
    return () if devices[0].platform == "cpu" else (0,)


def nll_loss(log_probs: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean negative log-likelihood: -1/B sum_b log p(y_b | x_b). ``(B, C), (B,) -> ()``.
    The model outputs log-probabilities, so this is optax's softmax cross-entropy of them (the
    log-softmax of a log-softmax is itself). ``label_smoothing`` alpha > 0: the cross-entropy
    against (1 - alpha) one_hot(y) + alpha / C (``optax.smooth_labels``; Szegedy et al. 2016)."""
    chex.assert_rank(log_probs, 2)
    chex.assert_rank(labels, 1)
    if not label_smoothing:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(log_probs, labels))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, log_probs.shape[-1], dtype=log_probs.dtype), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(log_probs, targets))


class BatchNormBatchError(ValueError):
    """Training a BatchNorm model on batches of one example. The head's BatchNorm (over the batch
    axis alone) then normalises every feature to its bias, so no gradient reaches the layers below
    it. Statistics are over the global batch (the sharded batch under jit, whatever the devices),
    so one example a device is fine as long as the global batch holds two or more."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        super().__init__(f"a BatchNorm model cannot train on batches of {batch_size} example: its head's "
                         "BatchNorm normalises a single example to its bias, so no gradient reaches the "
                         "layers below; batches of 2 or more (over all devices together) are needed")


def check_batch_norm_batch(batch_norm: bool, batch_size: int) -> None:
    """Raise :class:`BatchNormBatchError` where a training batch of ``batch_size`` (global, over
    all devices) is too small for BatchNorm's batch statistics; evaluation (running statistics)
    takes any batch."""
    if batch_norm and batch_size < 2:
        raise BatchNormBatchError(batch_size)


def pixels(images_u8: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 in [0, 1]."""
    return images_u8.astype(jnp.float32) / 255.0


def gather(data: dict, index: jax.Array, shape=None) -> dict:
    """The batch ``index`` (B,) of the training ``data`` on the devices (``images`` (N,48,48,3)
    uint8, ``labels`` (N,) int32): images (B,48,48,3), labels (B,). ``shape`` is unused."""
    return {"images": data["images"][index], "labels": data["labels"][index]}


class Trainer:
    """Holds what is static for a run (graphs, optimiser, mesh) and the jitted pure functions.

    ``devices``: the devices a batch is split over (default :func:`default_devices`);
    ``batch_size`` must be a multiple of their number (``ValueError`` otherwise). ``dtype``: the
    model's computation, "float32" or "bfloat16" (:mod:`common.precision`; the state stays float32).
    ``steps_per_call``: K, the steps of one dispatch (None: :func:`common.training.steps_per_call`'s
    default); ``trace``: a :class:`common.training.Trace` of the epoch it names (settable).
    Beyond the homework (whose values are the defaults): ``optimizer`` (:class:`common.optim.Optimizer`,
    at learning rate ``lr``), ``augment`` (:data:`cnn.augment.AUGMENTATIONS`, drawn from the step's
    key), ``label_smoothing`` (:func:`nll_loss`) and ``width`` (:class:`cnn.model.CNN`).
    """

    def __init__(self, batch_norm: bool, lr: float, batch_size: int, seed: int = 0, devices=None,
                 impl: str = "reference", pool: str = "average", dtype: str = "float32",
                 steps_per_call: int | None = None, *, optimizer: Optimizer = Optimizer(), augment: str = "none",
                 label_smoothing: float = 0.0, width: int = 1):
        devices = list(devices if devices is not None else default_devices())
        if batch_size % len(devices):
            raise ValueError(f"batch size {batch_size} must be a multiple of the {len(devices)} devices")
        self.batch_norm, self.lr, self.batch_size, self.seed, self.impl, self.pool = batch_norm, lr, batch_size, seed, impl, pool
        self.mesh = data_mesh(devices)
        self.replicated, self.batch_sharding = replicated(self.mesh), batch_sharding(self.mesh)
        self.wait_each_step = in_process_collectives(self.mesh)  # one step in flight (common.parallel)
        self.tx = optimizer(lr)
        self.dtype, self.augment, self.label_smoothing = dtype, augment, label_smoothing
        model = CNN(batch_norm, rngs=nnx.Rngs(params=seed), impl=impl, pool=pool, dtype=compute_dtype(dtype), width=width)
        model.train()
        self.train_graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        model.eval()
        self.eval_graph, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
        self._init = (params, stats)
        self.donate = donated_state(devices)  # the jitted steps' donate_argnums, SweepTrainer's too
        self.train_step = train_step(self._loss, self.tx, seed)
        self._train_step = jax.jit(self.train_step, donate_argnums=self.donate, out_shardings=self.replicated)
        self._block = self.block(self.train_step)
        self.steps_per_call, self.trace = steps_per_call, None
        self._placed = (None, None, None)  # (images, labels, their arrays on the devices) of the last epoch
        self._evaluate = jax.jit(self._evaluate_impl, static_argnames="batch", out_shardings=self.replicated)

    # -- state -------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        return init_state(*self._init, self.tx, self.replicated)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (:func:`common.training.abstract_state`)."""
        return abstract_state(self.init_state, self.replicated)

    def model(self, state: TrainState, train: bool = False) -> CNN:
        """A live NNX model holding ``state``'s arrays (eval mode unless ``train``)."""
        return nnx.merge(self.train_graph if train else self.eval_graph, state.params, state.stats)

    # -- training ----------------------------------------------------------------------------

    def _loss(self, params, stats, batch: dict, key):
        """Mean NLL of ``batch`` (``images`` (B,48,48,3) uint8, ``labels`` (B,)) in training mode
        (dropout from ``key``, the images augmented from ``fold_in(key, 1)``, BatchNorm on the
        batch's statistics) -> (loss, updated statistics). Raises :class:`BatchNormBatchError`
        (when traced) for a BatchNorm model and B = 1."""
        check_batch_norm_batch(self.batch_norm, batch["labels"].shape[0])  # the global batch's shape
        model = nnx.merge(self.train_graph, params, stats, copy=True)
        images = augment(jax.random.fold_in(key, 1), batch["images"], self.augment)
        log_probs = model(pixels(images), rngs=nnx.Rngs(dropout=key))
        return nll_loss(log_probs, batch["labels"], self.label_smoothing), nnx.state(model, nnx.BatchStat)

    def epoch_batches(self, n: int, epoch: int) -> np.ndarray:
        """(ceil(n / B), B) example indices of ``epoch`` (:func:`common.batching.epoch_batches`)."""
        return epoch_batches(n, self.batch_size, self.seed, epoch)

    def block(self, step):
        """The jitted :func:`common.training.block_step` of ``step(state, batch, epoch) -> (state,
        loss)`` over batches gathered by :func:`gather`."""
        return jit_block(block_step(step, gather, self.batch_sharding), self.replicated, self.donate)

    def train_epoch(self, state, images, labels, epoch: int, progress=None):
        """One epoch of jitted steps on ``images`` (N,48,48,3) uint8 and ``labels`` (N,) (host
        arrays, or arrays placed with :meth:`put`); returns (state, mean training loss over its
        batches). ``progress`` is called with K after each dispatch of K steps. Losses stay on the
        devices until the epoch ends, so the host never waits on a step."""
        state, losses = self.run_epoch(self._block, state, images, labels, epoch, progress)
        return state, float(losses)

    def placed(self, images, labels) -> dict[str, jax.Array]:
        """The training arrays replicated on the devices, placed once for the same two arrays."""
        if self._placed[0] is not images or self._placed[1] is not labels:
            arrays = {"images": to_host(images), "labels": to_host(labels).astype(np.int32)}
            self._placed = (images, labels, self.put(arrays))
        return self._placed[2]

    def run_epoch(self, block, state, images, labels, epoch: int, progress=None):
        """:func:`common.training.run_epoch` of ``block`` (:meth:`block`) over ``epoch``'s batches of
        ``images`` and ``labels`` (placed on the devices once: :meth:`placed`), K steps a call;
        returns (state, the mean of the losses over the batches, as a host array)."""
        data = self.placed(images, labels)
        indices = self.epoch_batches(len(labels), epoch)
        K = steps_per_call(self.steps_per_call, len(indices), self.mesh.devices.flat[0].platform, CPU_STEPS_PER_CALL)
        return run_epoch(block, state, data, indices, epoch, self.batch_sharding, K, None, self.wait_each_step, progress,
                         self.trace)

    def put(self, array):
        """Place a host array (or a tree of them), held in full by every process, on every device."""
        return put_replicated(self.mesh, array)

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
            nll = optax.softmax_cross_entropy_with_integer_labels(log_probs, labels[idx])
            return total + jnp.sum(jnp.where(mask, nll, 0.0)), jnp.argmax(log_probs, axis=1)

        total, preds = jax.lax.scan(step, jnp.float32(0), (index.reshape(steps, batch), valid))
        return preds.reshape(-1)[:n], total / n

    def validation(self, split) -> Callable[[TrainState], dict]:
        """``state -> {"val_acc", "val_loss"}`` on ``split`` (its images and labels placed once)."""
        images, labels = self.put(split.images), self.put(split.labels)

        def validate(state: TrainState) -> dict:
            result = self.evaluate(state, images, labels)
            return {"val_acc": result["acc"], "val_loss": result["loss"]}

        return validate

    def evaluate(self, state: TrainState, images, labels, batch: int = 250) -> dict:
        """Accuracy, mean NLL and predictions on data placed with :meth:`put`."""
        preds, loss = self._evaluate(state.params, state.stats, images, labels, batch=batch)
        preds = to_host(preds)
        return {"acc": float(np.mean(preds == to_host(labels))), "loss": float(to_host(loss)), "preds": preds}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (labels, preds), 1)
    return counts


class SweepTrainer:
    """Several learning rates trained as one program: ``jax.vmap`` of the ordinary
    :meth:`Trainer.train_step` over a leading axis of the state (:func:`common.training.stack`),
    whose learning rate is a leaf (``optax.inject_hyperparams``). ``members``: the plain trainers
    of the learning rates (same model, batch size, seed and devices), whose states are stacked.
    Every member sees the same batches and dropout keys as it does alone, so a member's trajectory
    is the one its sequential run takes, up to floating-point reassociation.
    """

    def __init__(self, members: list[Trainer]):
        self.members = list(members)
        lead = self.members[0]
        step = jax.vmap(lead.train_step, in_axes=(0, None, None))
        self._train_step = jax.jit(step, donate_argnums=lead.donate, out_shardings=lead.replicated)
        self._block = lead.block(step)

    stack, member = staticmethod(stack), staticmethod(member)

    def train_epoch(self, state: TrainState, images, labels, epoch: int, progress=None):
        """One epoch for every member at once, K steps a call (the first member's
        ``steps_per_call`` and ``trace``) -> (state, (L,) mean training losses)."""
        return self.members[0].run_epoch(self._block, state, images, labels, epoch, progress)
