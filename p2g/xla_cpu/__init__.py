"""The P2G model's ``xla_cpu`` implementation: the same model as :mod:`p2g.model`, computed by
kernels chosen for XLA:CPU, each tested equal to the reference layer it replaces.

- :class:`LSTM`: ``nnx.RNN`` over an LSTM cell, computed by :func:`p2g.xla_cpu.lstm.lstm_layer`
  (the input projections of all steps as one product, a hand-written reverse loop, the weight
  gradients as products over all rows after it), where autodiff of ``lax.scan`` computes each
  step's parameter gradient inside the reverse loop.
- :class:`common.dropout.HashedDropout`: dropout masks that XLA fuses (no Threefry loops).

Select it with ``p2g.Seq2Seq(..., impl="xla_cpu")`` or ``--impl xla_cpu``; docs/performance.md
has the measurements behind each kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from common.dropout import HashedDropout
from p2g.model import Layers
from p2g.xla_cpu.lstm import lstm_layer


class LSTM(nnx.RNN):
    """``nnx.RNN(nnx.OptimizedLSTMCell)`` (same parameters, same function) computed by
    :func:`p2g.xla_cpu.lstm.lstm_layer`. Batch-major inputs (B,S,D); ``seq_lengths`` (B,) as in
    ``nnx.RNN`` (steps past a length keep the carry; their outputs are 0 here); ``reverse`` reads
    each sequence last valid step first and, with ``keep_order`` (how ``nnx.Bidirectional`` calls
    it), writes each output at its input's position. Inputs and parameters are cast to the cell's
    ``dtype`` as the cell casts them (the carry keeps its own). Raises ``ValueError`` for
    time-major inputs or reversed outputs (``reverse`` without ``keep_order``)."""

    def __init__(self, cell: nnx.OptimizedLSTMCell, **kwargs):
        super().__init__(cell, rngs=False, **kwargs)

    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry=None, time_major=None,
                 reverse=None, keep_order=None, rngs=None):
        pick = lambda given, default: default if given is None else given
        reverse, keep_order = pick(reverse, self.reverse), pick(keep_order, self.keep_order)
        if pick(time_major, self.time_major) or (reverse and not keep_order):
            raise ValueError("p2g.xla_cpu.LSTM takes batch-major inputs and keeps their order")
        B, S, D = inputs.shape
        cell = self.cell
        if initial_carry is None:
            zeros = jnp.zeros((B, cell.hidden_features), inputs.dtype)
            initial_carry = (zeros, zeros)
        lengths = jnp.full((B,), S, jnp.int32) if seq_lengths is None else seq_lengths
        inputs, kernel_i, kernel_h, bias = cell.promote_dtype(
            (inputs, cell.dense_i.kernel[...], cell.dense_h.kernel[...], cell.dense_h.bias[...]), dtype=cell.dtype)
        carry, outputs = lstm_layer(bool(reverse), kernel_i, kernel_h, bias, inputs.reshape(B * S, D),
                                    jnp.arange(B, dtype=jnp.int32) * S, lengths, initial_carry)
        outputs = outputs.reshape(B, S, -1)
        return (carry, outputs) if pick(return_carry, self.return_carry) else outputs


LAYERS = Layers(rnn=LSTM, dropout=HashedDropout)

__all__ = ["LAYERS", "LSTM"]
