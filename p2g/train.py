"""Pure, jit-compiled Adam training of :class:`p2g.model.Seq2Seq` and batched decoding.

The model is split once into a static graph and its parameters; a training step is one jitted
pure function of (state, batch, epoch key) over a global batch sharded along the ``data`` mesh
axis (:mod:`common.parallel`), parameters and Adam state replicated:

    loss = sum of the target tokens' cross-entropy / target tokens in the batch
    params <- adam(grad loss)                                       (optax, lr injected)

The training arrays stay on the devices (replicated: every device holds the whole, small, training
set; each process places it from its own full copy) and each dispatch runs K steps, a
``lax.scan`` over K batches gathered on the devices (:func:`common.training.block_step`), by
default the whole epoch on an accelerator and :data:`CPU_STEPS_PER_CALL` on a CPU. A batch is a
dict of arrays (``src``, ``src_len``, ``tgt_in``, ``tgt_out``) cut to the longest source and
target of its block of K batches, rounded up to a multiple of 8 (:func:`batch_widths`), so jit
compiles a handful of shapes; the epoch's batches group words of similar length
(:func:`common.batching.bucketed_batches`) so that little of a batch is padding (with K = 1).
Batches and dropout keys are functions of (seed, epoch, step), and dropout masks of the global
batch, so a resumed run, or one split over any number of devices or processes, repeats an
uninterrupted one-device run. The dropout masks are functions of positions in the padded batch, so
where a block pads a batch beyond its own widths (K > 1) its masks differ from K = 1's: with
dropout, K changes the (equally random) masks; without, only speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from common.batching import bucketed_batches
from common.optim import Optimizer
from common.parallel import batch_sharding, data_mesh, in_process_collectives, put_replicated, replicated, to_host
from common.precision import compute_dtype
from common.training import TrainState, abstract_state, block_step, init_state, jit_block, run_epoch, steps_per_call, train_step
from p2g.data import Batchable, Vocab, round_up
from p2g.decode import beam_search, decode
from p2g.metrics import cer, wer
from p2g.model import Seq2Seq, sequence_loss

# K of a CPU run (--steps-per-call's default there): a block is padded to its longest words, which
# costs more than the dispatches it saves (docs/performance.md).
CPU_STEPS_PER_CALL = 1


def batch_widths(data: Batchable, index: np.ndarray, multiple: int = 8) -> tuple[int, int]:
    """(source width, target width) for the examples ``index`` (any shape): longest, rounded up
    to ``multiple`` (1: the exact longest)."""
    src_w = round_up(int(data.src_len[index].max()), multiple)
    tgt_w = round_up(int(data.tgt_len[index].max()), multiple)
    return min(src_w, data.src.shape[1]), min(tgt_w, data.tgt_out.shape[1])


def gather(data: dict, index: jax.Array, widths: tuple[int, int]) -> dict:
    """The batch ``index`` (B,) of the training ``data`` on the devices (``src`` (N,S0),
    ``src_len`` (N,), ``tgt_in`` and ``tgt_out`` (N,T0)), cut to ``widths`` (S, T) (static):
    src (B,S), src_len (B,), tgt_in (B,T), tgt_out (B,T)."""
    S, T = widths
    return {"src": data["src"][index, :S], "src_len": data["src_len"][index],
            "tgt_in": data["tgt_in"][index, :T], "tgt_out": data["tgt_out"][index, :T]}


class Trainer:
    """What is static for a run (graphs, optimiser, mesh) and the jitted pure functions.

    ``devices``: the devices a batch is split over (default: every device of every process);
    ``batch_size`` must be a multiple of their number (``ValueError`` otherwise). ``dtype``: the
    model's computation, "float32" or "bfloat16" (:mod:`common.precision`; the state stays float32).
    ``steps_per_call``: K, the steps of one dispatch (None: :func:`common.training.steps_per_call`'s
    default); ``trace``: a :class:`common.training.Trace` of the epoch it names (settable).
    Beyond the homework (whose values are the defaults): ``optimizer`` (:class:`common.optim.Optimizer`
    at learning rate ``lr``), ``label_smoothing`` of the training loss (:func:`p2g.model.summed_nll`;
    the validation loss stays the plain NLL) and ``encoder_layers`` (:class:`p2g.model.Seq2Seq`).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, *, hidden=128, dropout=0.3, attention=False,
                 lr=0.003, batch_size=64, seed=0, devices: Sequence[jax.Device] | None = None,
                 impl: str = "reference", hopfield_steps: int = 1, bucket: int = 16, dtype: str = "float32",
                 steps_per_call: int | None = None, optimizer: Optimizer = Optimizer("adam"),
                 label_smoothing: float = 0.0, encoder_layers: int = 1):
        self.batch_size, self.seed, self.bucket = batch_size, seed, bucket
        self.mesh = data_mesh(devices)
        if batch_size % self.mesh.size:
            raise ValueError(f"batch size {batch_size} must be a multiple of the {self.mesh.size} devices")
        self.batch_sharding, self.replicated = batch_sharding(self.mesh), replicated(self.mesh)
        self.wait_each_step = in_process_collectives(self.mesh)  # one step in flight (common.parallel)
        self.tx, self.label_smoothing = optimizer(lr), label_smoothing
        model = Seq2Seq(src_vocab, tgt_vocab, hidden, dropout, attention, rngs=nnx.Rngs(params=seed), impl=impl,
                        hopfield_steps=hopfield_steps, dtype=compute_dtype(dtype), encoder_layers=encoder_layers)
        model.train()
        self.train_graph, self._params = nnx.split(model, nnx.Param)
        model.eval()
        self.eval_graph, _ = nnx.split(model, nnx.Param)
        self.attention, self.impl, self.dtype = attention, impl, dtype
        self.donate = (0,) if self.mesh.devices.flat[0].platform != "cpu" else ()
        self.train_step = train_step(self._loss, self.tx, seed)
        self._block = self.block(self.train_step)
        self.steps_per_call, self.trace = steps_per_call, None
        self._train_data = (None, None)  # (data, its arrays on the devices) of the last epoch
        self._eval_loss = jax.jit(self._eval_loss_impl, out_shardings=self.replicated)
        self._decode = jax.jit(self._decode_impl, static_argnames=("max_len", "top_p"), out_shardings=self.replicated)
        self._beam = jax.jit(self._beam_impl, static_argnames=("width", "max_len", "alpha"), out_shardings=self.replicated)
        self._placed = (None, None)  # (data, its arrays on the devices) of the last loss() call

    # -- state -------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        return init_state(self._params, nnx.State({}), self.tx, self.replicated)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (:func:`common.training.abstract_state`)."""
        return abstract_state(self.init_state, self.replicated)

    # -- training ----------------------------------------------------------------------------

    def _loss(self, params, stats, batch: dict, key):
        """sum of the NLL of the batch's target tokens / their number (PAD positions excluded), in
        training mode (dropout from ``key``) -> (loss, ``stats`` unchanged: the model has none)."""
        model = nnx.merge(self.train_graph, params, copy=True)
        logits = model(batch["src"], batch["src_len"], batch["tgt_in"], nnx.Rngs(dropout=key))
        return sequence_loss(logits, batch["tgt_out"], self.label_smoothing), stats

    def epoch_batches(self, data: Batchable, epoch: int) -> np.ndarray:
        """(steps, B) example indices of ``epoch``, words of similar length batched together."""
        return bucketed_batches(data.src_len + data.tgt_len, self.batch_size, self.seed, epoch, self.bucket)

    def block(self, step):
        """The jitted :func:`common.training.block_step` of ``step(state, batch, epoch) -> (state,
        loss)`` over batches gathered by :func:`gather`."""
        return jit_block(block_step(step, gather, self.batch_sharding), self.replicated, self.donate)

    def train_epoch(self, state: TrainState, data: Batchable, epoch: int, progress=None):
        """One pass over ``data`` in seeded batches (:meth:`run_epoch`): (state, mean of the
        batches' losses). ``progress`` is called with K after each dispatch of K steps."""
        state, loss = self.run_epoch(self._block, state, data, epoch, progress)
        return state, float(loss)

    def run_epoch(self, block, state: TrainState, data: Batchable, epoch: int, progress=None):
        """:func:`common.training.run_epoch` of ``block`` (:meth:`block`) over ``epoch``'s batches of
        ``data`` (placed on the devices once for the same ``data``), K steps a call, each block cut
        to its longest words (:func:`batch_widths`); returns (state, the mean of the losses over
        the batches, as a host array)."""
        if self._train_data[0] is not data:
            arrays = {"src": data.src, "src_len": data.src_len, "tgt_in": data.tgt_in, "tgt_out": data.tgt_out}
            self._train_data = (data, put_replicated(self.mesh, arrays))
        indices = self.epoch_batches(data, epoch)
        K = steps_per_call(self.steps_per_call, len(indices), self.mesh.devices.flat[0].platform, CPU_STEPS_PER_CALL)
        return run_epoch(block, state, self._train_data[1], indices, epoch, self.batch_sharding, K,
                         lambda rows: batch_widths(data, rows), self.wait_each_step, progress, self.trace)

    # -- evaluation --------------------------------------------------------------------------

    def validation(self, data: Batchable, vocab: Vocab) -> Callable[[TrainState], dict]:
        """``state -> {"val_loss", "val_cer", "val_wer"}`` on ``data`` (CER and WER of greedy decoding)."""
        def validate(state: TrainState) -> dict:
            hypotheses = self.decode(state, data, vocab)
            return {"val_loss": self.loss(state, data), "val_cer": cer(data.spellings, hypotheses),
                    "val_wer": wer(data.spellings, hypotheses)}

        return validate

    def loss(self, state: TrainState, data: Batchable) -> float:
        """Mean teacher-forced loss in eval mode (no dropout) over all target tokens, one jitted
        program over the whole data."""
        if self._placed[0] is not data:  # the validation set every epoch: placed on the devices once
            self._placed = (data, put_replicated(self.mesh, (data.src, data.src_len, data.tgt_in, data.tgt_out)))
        return float(to_host(self._eval_loss(state.params, *self._placed[1])))

    def _eval_loss_impl(self, params, src, src_len, tgt_in, tgt_out):
        model = nnx.merge(self.eval_graph, params)
        return sequence_loss(model(src, src_len, tgt_in), tgt_out)

    def _decode_impl(self, params, src, src_len, key_data, max_len, top_p):
        key = jax.random.wrap_key_data(key_data)
        return decode(nnx.merge(self.eval_graph, params), src, src_len, max_len, top_p, key)

    def _beam_impl(self, params, src, src_len, width, max_len, alpha):
        return beam_search(nnx.merge(self.eval_graph, params), src, src_len, width, max_len, alpha)

    def _sources(self, data: Batchable, start: int, batch: int):
        """Rows start..start+batch (wrapping round), cut to their widths, replicated."""
        index = np.arange(start, start + batch) % len(data)
        S, _ = batch_widths(data, index)
        return put_replicated(self.mesh, (data.src[index, :S], data.src_len[index]))

    def beam_decode(self, state: TrainState, data: Batchable, vocab: Vocab, width: int, max_len=50, batch=250,
                    alpha: float = 0.0):
        """Best-beam spellings for every example; ``alpha``: the length penalty's exponent
        (:func:`p2g.decode.beam_search`)."""
        words = []
        for start in range(0, len(data), batch):
            tokens = to_host(self._beam(state.params, *self._sources(data, start, batch), width=width, max_len=max_len,
                                          alpha=alpha))
            words.extend(vocab.decode(row) for row in tokens[: min(batch, len(data) - start)])
        return words

    def decode(self, state: TrainState, data: Batchable, vocab: Vocab, *, top_p=None, key=None,
               max_len=50, batch=500, attention=False):
        """Spellings for every example (fixed-size batches, the last padded), and with
        ``attention`` the (n, max_len, S) weights."""
        key = jax.random.key(self.seed) if key is None else key
        n = len(data)
        words, weights = [], []
        for start in range(0, n, batch):
            src, src_len = self._sources(data, start, batch)
            key_data = put_replicated(self.mesh, jax.random.key_data(jax.random.fold_in(key, start)))
            out = self._decode(state.params, src, src_len, key_data, max_len=max_len, top_p=top_p)
            count = min(batch, n - start)
            tokens = to_host(out.tokens)[:count]
            words.extend(vocab.decode(row) for row in tokens)
            if attention:
                padded = np.zeros((count, max_len, data.src.shape[1]), np.float32)
                padded[:, :, : src.shape[1]] = to_host(out.attention)[:count]
                weights.append(padded)
        return (words, np.concatenate(weights)) if attention else words
