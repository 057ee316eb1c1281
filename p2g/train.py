"""Pure, jit-compiled Adam training of :class:`p2g.model.Seq2Seq` and batched decoding.

As in :mod:`cnn.train`: the model is split once into a static graph and its parameters; a step
is a pure function of arrays. A batch is cut to its longest source and target rounded up to a
multiple of 8 (:func:`batch_widths`), so jit compiles a handful of shapes, not one per batch, and
travels as one int32 vector (:class:`Layout`).
Batches come from a per-epoch permutation seeded by (seed, epoch), dropout keys from
(seed, step), so a resumed run repeats an uninterrupted one exactly.

Data parallel without collectives: given ``devices`` (N > 1 entries), each batch is sorted by
word length and cut into N shards, the shortest words first and in the largest shard
(:func:`length_sorted_shards`; each shard is cut to its own widths or rows, so the short words do
not pay for the long ones' padding). Shard i goes to ``devices[i]``
with its own copy of the parameters and dropout key fold_in(key, i), every device computes the
gradient of sum(nll of its shard) / (tokens in the whole batch), and ``devices[0]`` adds the N
gradients (their sum is the gradient of the batch's mean loss) and applies Adam. JAX dispatches
asynchronously, so the shards run at the same time; on a CPU each XLA host device runs on its own
core (:func:`experiments._xla.request_cpu_devices`), which is how this loop uses both cores of a
small machine whose LSTM kernels run one core each. The same device may appear twice (the shards
then run one after the other, same numbers).
Parameters and gradients cross between devices as one flat vector each (``ravel_pytree``): one
transfer and one dispatch argument instead of one per parameter array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from p2g.data import PAD, Batchable, Vocab, round_up
from p2g.decode import beam_search, decode
from p2g.model import Seq2Seq, sequence_loss, summed_nll


def batch_widths(data: Batchable, index: np.ndarray, multiple: int = 8) -> tuple[int, int]:
    """(source width, target width) for the examples ``index``: longest, rounded up to
    ``multiple`` (1: the exact longest)."""
    src_w = round_up(int(data.src_len[index].max()), multiple)
    tgt_w = round_up(int(data.tgt_len[index].max()), multiple)
    return min(src_w, data.src.shape[1]), min(tgt_w, data.tgt_out.shape[1])


def shard_sizes(batch: int, n: int) -> list[int]:
    """How many examples each of ``n`` shards of a length-sorted batch takes, shortest words
    first: shares proportional to 1 / (i + 1.5), at least one example each (two shards of 64:
    40 and 24). A shard's time grows with its rows times its widths, and the longer words' shard
    has the larger widths, so it gets fewer rows."""
    if not 1 <= n <= batch:
        raise ValueError(f"{n} shards for a batch of {batch}: at least one example a shard")
    weights = 1.0 / (np.arange(n) + 1.5)
    sizes = 1 + np.floor(weights / weights.sum() * (batch - n)).astype(int)
    sizes[np.argsort(-weights)[: batch - sizes.sum()]] += 1  # the remainder to the short-word shards
    return sizes.tolist()


def length_sorted_shards(data: Batchable, index: np.ndarray, n: int) -> list[np.ndarray]:
    """The batch ``index`` cut into ``n`` shards of :func:`shard_sizes`, after sorting it by word
    length (phonemes + letters; stable). Each shard is then cut to its own widths
    (:meth:`Trainer._batch`), so the short words no longer pay for the long ones' widths; the
    union is the same batch."""
    lengths = data.src_len[index] + data.tgt_len[index]
    ordered = index[np.argsort(lengths, kind="stable")]
    return np.split(ordered, np.cumsum(shard_sizes(len(index), n))[:-1])


class Layout(NamedTuple):
    """The shapes of a batch's one int32 vector (static under jit): B examples, widths (S, T)."""

    examples: int
    widths: tuple[int, int]


def split_batch(vector, layout: Layout):
    """One batch vector -> src (B,S), src_len (B,), tgt_in (B,T), tgt_out (B,T); the order of
    :meth:`Trainer._batch`."""
    B, (S, T) = layout
    src, src_len, tgt_in, tgt_out = jnp.split(vector, np.cumsum([B * S, B, B * T]))
    return src.reshape(B, S), src_len, tgt_in.reshape(B, T), tgt_out.reshape(B, T)


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array


class Trainer:
    def __init__(self, src_vocab: int, tgt_vocab: int, *, hidden=128, dropout=0.3, attention=False,
                 lr=0.003, batch_size=64, seed=0, devices: Sequence[jax.Device] | None = None,
                 impl: str = "reference", hopfield_steps: int = 1):
        self.batch_size, self.seed = batch_size, seed
        self.devices = list(devices) if devices else [jax.devices()[0]]
        if len(self.devices) > batch_size:
            raise ValueError(f"{len(self.devices)} devices for batches of {batch_size}: at most one device an example")
        self.tx = optax.adam(lr)
        model = Seq2Seq(src_vocab, tgt_vocab, hidden, dropout, attention, rngs=nnx.Rngs(params=seed), impl=impl,
                        hopfield_steps=hopfield_steps)
        model.train()
        self.train_graph, self._params = nnx.split(model, nnx.Param)
        model.eval()
        self.eval_graph, _ = nnx.split(model, nnx.Param)
        self._unravel = ravel_pytree(self._params)[1]  # flat vector -> parameters (sharded steps)
        self.attention, self.impl = attention, impl
        self._step = jax.jit(self._step_impl, donate_argnums=0, static_argnames="layout")
        self._shard_grad = jax.jit(self._shard_grad_impl, static_argnames="layout")
        self._apply = jax.jit(self._apply_impl, donate_argnums=0)
        self._ravel = jax.jit(lambda params: ravel_pytree(params)[0])
        self._eval_loss = jax.jit(self._eval_loss_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("max_len", "top_p"))
        self._beam = jax.jit(self._beam_impl, static_argnames=("width", "max_len"))

    def init_state(self) -> TrainState:
        return jax.device_put(TrainState(self._params, self.tx.init(self._params), jnp.int32(0)), self.devices[0])

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self.init_state)

    def _key(self, step):
        return jax.random.fold_in(jax.random.key(self.seed), step)

    def _loss(self, params, batch, layout: Layout, key, tokens):
        """sum of the NLL of the batch's target tokens / ``tokens``."""
        src, src_len, tgt_in, tgt_out = split_batch(batch, layout)
        model = nnx.merge(self.train_graph, params, copy=True)
        return summed_nll(model(src, src_len, tgt_in, nnx.Rngs(dropout=key)), tgt_out) / tokens

    def _update(self, state: TrainState, grads) -> TrainState:
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)

    def _step_impl(self, state: TrainState, batch, layout: Layout):
        """One device: the gradient of the batch's mean loss and the update, one program."""
        tokens = jnp.maximum(jnp.sum(split_batch(batch, layout)[3] != PAD), 1)
        loss, grads = jax.value_and_grad(self._loss)(state.params, batch, layout, self._key(state.step), tokens)
        return self._update(state, grads), loss

    def _shard_grad_impl(self, flat_params, batch, step, shard, tokens, layout: Layout):
        """Shard ``shard`` of batch ``step``: its share of the loss and of the gradient. Parameters,
        batch and gradient travel as one vector each (one transfer between devices or from the
        host, not one a parameter or an array)."""
        key = jax.random.fold_in(self._key(step), shard)
        loss, grads = jax.value_and_grad(self._loss)(self._unravel(flat_params), batch, layout, key, tokens)
        return loss, ravel_pytree(grads)[0]

    def _apply_impl(self, state: TrainState, losses, flat_grads):
        """Sum the shards' losses and flat gradients (lists, all on devices[0]) and update:
        (state, loss, the new parameters as a flat vector)."""
        state = self._update(state, self._unravel(sum(flat_grads)))
        return state, sum(losses), ravel_pytree(state.params)[0]

    def epoch_batches(self, n: int, epoch: int) -> list[np.ndarray]:
        """Seeded permutation cut into full batches; the last one completed from the start."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        steps = -(-n // self.batch_size)
        perm = np.concatenate([perm, perm[: steps * self.batch_size - n]])
        return np.split(perm, steps)

    def train_epoch(self, state: TrainState, data: Batchable, epoch: int, progress=None):
        """One pass over ``data`` in seeded batches: (state, mean of the batches' losses). The step
        number is counted on the host (one sync an epoch), so with several devices none waits on
        another's scalar to derive its dropout key."""
        state = jax.device_put(state, self.devices[0])
        step, losses = int(state.step), []
        sharded = len(self.devices) > 1
        flat = self._ravel(state.params) if sharded else None  # the parameters as the shards take them
        for index in self.epoch_batches(len(data), epoch):
            if sharded:
                state, loss, flat = self._train_batch_sharded(state, flat, data, index, step)
            else:
                state, loss = self._train_batch(state, data, index, step)
            losses.append(loss)
            step += 1
            if progress is not None:
                progress(1)
        return state, float(jnp.mean(jnp.stack(losses)))

    def _batch(self, data: Batchable, index: np.ndarray):
        """The examples ``index``, cut to :func:`batch_widths`, as one int32 vector and its
        :class:`Layout` (:func:`split_batch` takes them apart)."""
        widths = S, T = batch_widths(data, index)
        vector = np.concatenate([data.src[index, :S].ravel(), data.src_len[index],
                                 data.tgt_in[index, :T].ravel(), data.tgt_out[index, :T].ravel()]).astype(np.int32)
        return vector, Layout(len(index), widths)

    def _train_batch(self, state: TrainState, data: Batchable, index: np.ndarray, step: int):
        """One device: the fused step (its key comes from ``state.step``, equal to ``step``)."""
        batch, layout = self._batch(data, index)
        return self._step(state, batch, layout=layout)

    def _train_batch_sharded(self, state: TrainState, flat, data: Batchable, index: np.ndarray, step: int):
        """The batch split over ``self.devices`` (:func:`length_sorted_shards`), each shard cut to
        its own widths (:meth:`_batch`); ``flat`` is ``state.params`` as one vector.
        Returns (state, loss, the new flat parameters)."""
        home, others = self.devices[0], self.devices[1:]
        tokens = max(int(np.sum(data.tgt_len[index])), 1)
        replicas = [flat] + [jax.device_put(flat, device) for device in others]
        results = []
        for shard, (part, device, params) in enumerate(zip(length_sorted_shards(data, index, len(self.devices)),
                                                           self.devices, replicas)):
            batch, layout = self._batch(data, part)
            results.append(self._shard_grad(params, jax.device_put(batch, device), step, shard, tokens, layout=layout))
        shard_losses, grads = zip(*jax.device_put(results, home))
        return self._apply(state, list(shard_losses), list(grads))

    def loss(self, state: TrainState, data: Batchable) -> float:
        """Mean teacher-forced loss in eval mode (no dropout) over all target tokens, one jitted
        program over the whole data (op by op it took 0.8–1.1 s for 1,000 words)."""
        return float(self._eval_loss(state.params, data.src, data.src_len, data.tgt_in, data.tgt_out))

    def _eval_loss_impl(self, params, src, src_len, tgt_in, tgt_out):
        model = nnx.merge(self.eval_graph, params)
        return sequence_loss(model(src, src_len, tgt_in), tgt_out)

    def _decode_impl(self, params, src, src_len, key, max_len, top_p):
        return decode(nnx.merge(self.eval_graph, params), src, src_len, max_len, top_p, key)

    def _beam_impl(self, params, src, src_len, width, max_len):
        return beam_search(nnx.merge(self.eval_graph, params), src, src_len, width, max_len)

    def beam_decode(self, state: TrainState, data: Batchable, vocab: Vocab, width: int, max_len=50, batch=250):
        """Best-beam spellings for every example."""
        words = []
        for start in range(0, len(data), batch):
            index = np.arange(start, start + batch) % len(data)
            S, _ = batch_widths(data, index)
            tokens = self._beam(state.params, data.src[index, :S], data.src_len[index], width=width, max_len=max_len)
            words.extend(vocab.decode(row) for row in np.asarray(tokens)[: min(batch, len(data) - start)])
        return words

    def decode(self, state: TrainState, data: Batchable, vocab: Vocab, *, top_p=None, key=None,
               max_len=50, batch=500, attention=False):
        """Spellings for every example (fixed-size batches, the last padded), and with
        ``attention`` the (n, max_len, S) weights."""
        key = jax.random.key(self.seed) if key is None else key
        n = len(data)
        words, weights = [], []
        for start in range(0, n, batch):
            index = np.arange(start, start + batch) % n
            S, _ = batch_widths(data, index)
            out = self._decode(state.params, data.src[index, :S], data.src_len[index], jax.random.fold_in(key, start),
                               max_len=max_len, top_p=top_p)
            count = min(batch, n - start)
            tokens = np.asarray(out.tokens)[:count]
            words.extend(vocab.decode(row) for row in tokens)
            if attention:
                padded = np.zeros((count, max_len, data.src.shape[1]), np.float32)
                padded[:, :, :S] = np.asarray(out.attention)[:count]
                weights.append(padded)
        return (words, np.concatenate(weights)) if attention else words
