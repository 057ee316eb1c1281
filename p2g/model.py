"""The homework's recurrent encoder-decoder for P2G (Question 3), in Flax NNX.

Shapes: B batch, S source length, T target length, H hidden size (128).

Encoder: embed (B,S)->(B,S,H) -> dropout -> BiLSTM, H/2 per direction, masked by source
length -> outputs (B,S,H) -> dropout; final state: [h_fwd; h_bwd], [c_fwd; c_bwd], each (B,H).
Decoder: embed -> dropout -> LSTM(H) started from the encoder's final state -> outputs s_t
-> [attention] -> dropout -> logits = out E^T (the generator is tied to the decoder embedding).
Bahdanau attention over the encoder outputs h_i (PAD positions masked out):

    e_ti = v^T tanh(W_s s_t + W_h h_i),   a_t = softmax(e_t),   c_t = sum_i a_ti h_i,
    s~_t = tanh(W_out [c_t; s_t])

As in the homework, attention changes each step's output and is not fed back into the LSTM, so
with teacher forcing the LSTM runs over all steps first and attention is applied to every step
at once; decoding (:mod:`p2g.decode`) runs the same functions one step at a time.
Time loops are ``jax.lax`` loops (the LSTM's ``fori_loop``s stop at the batch's longest sequence,
:mod:`p2g.lstm`); dropout draws from ``rngs`` passed per call.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from p2g.data import PAD
from p2g.dropout import HashedDropout
from p2g.lstm import lstm_layer


def masked_lstm_scan(cell: nnx.OptimizedLSTMCell, inputs, lengths, carry):
    """Run ``cell`` over time; steps at t >= length leave the carry unchanged and output 0.
    ``inputs`` (B,S,D), ``lengths`` (B,) -> (final carry at each sequence's last real step,
    outputs (B,S,H)). One loop over time with the cell's parameters, and a gradient of our own
    (:func:`p2g.lstm.lstm_layer`): the same function as calling ``cell`` step by step."""
    chex.assert_rank([inputs, lengths], [3, 1])
    chex.assert_equal_shape_prefix([inputs, lengths], 1)
    alive = jnp.arange(inputs.shape[1])[:, None] < lengths[None, :]  # (S,B)
    carry, outputs = lstm_layer(cell.dense_i.kernel[...], cell.dense_h.kernel[...], cell.dense_h.bias[...],
                                jnp.swapaxes(inputs, 0, 1), alive, carry)
    return carry, jnp.swapaxes(outputs, 0, 1)


def reverse_within_length(x, lengths):
    """Reverse each sequence's first ``length`` steps, leaving padding in place (an involution).
    ``x`` (B,S,...) -> (B,S,...)."""
    t = jnp.arange(x.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class Encoder(nnx.Module):
    def __init__(self, vocab_size: int, hidden: int, dropout: float, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab_size, hidden, rngs=rngs)
        self.forward_cell = nnx.OptimizedLSTMCell(hidden, hidden // 2, rngs=rngs)
        self.backward_cell = nnx.OptimizedLSTMCell(hidden, hidden // 2, rngs=rngs)
        self.dropout = HashedDropout(dropout)
        self.half = hidden // 2

    def __call__(self, src, src_len, rngs: nnx.Rngs | None = None):
        """``src`` (B,S) int, ``src_len`` (B,) -> outputs (B,S,H), final (h, c) each (B,H)."""
        chex.assert_rank([src, src_len], [2, 1])
        x = self.dropout(self.embedding(src), rngs=rngs)
        zeros = jnp.zeros((src.shape[0], self.half), x.dtype)
        (c_f, h_f), out_f = masked_lstm_scan(self.forward_cell, x, src_len, (zeros, zeros))
        (c_b, h_b), out_b = masked_lstm_scan(self.backward_cell, reverse_within_length(x, src_len), src_len, (zeros, zeros))
        outputs = jnp.concatenate([out_f, reverse_within_length(out_b, src_len)], axis=-1)
        final = (jnp.concatenate([c_f, c_b], -1), jnp.concatenate([h_f, h_b], -1))  # (c, h) as the cell's carry
        return self.dropout(outputs, rngs=rngs), final


class BahdanauAttention(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.W_s = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
        self.W_h = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(hidden, 1, use_bias=False, rngs=rngs)
        self.W_out = nnx.Linear(2 * hidden, hidden, use_bias=False, rngs=rngs)

    def weights(self, s, keys, src_mask):
        """Attention weights (B,T,S) of decoder states ``s`` (B,T,H) over encoder outputs
        ``keys`` (B,S,H); PAD positions (``src_mask`` False) get weight 0."""
        scores = self.v(jnp.tanh(self.W_s(s)[:, :, None, :] + self.W_h(keys)[:, None, :, :]))[..., 0]
        return jax.nn.softmax(jnp.where(src_mask[:, None, :], scores, -jnp.inf), axis=-1)

    def __call__(self, s, keys, src_mask):
        """s~ = tanh(W_out [c; s]): (B,T,H) and the weights (B,T,S)."""
        alpha = self.weights(s, keys, src_mask)
        context = jnp.einsum("bts,bsh->bth", alpha, keys)
        return jnp.tanh(self.W_out(jnp.concatenate([context, s], axis=-1))), alpha


class Decoder(nnx.Module):
    def __init__(self, vocab_size: int, hidden: int, dropout: float, attention: bool, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab_size, hidden, rngs=rngs)
        self.cell = nnx.OptimizedLSTMCell(hidden, hidden, rngs=rngs)
        self.attention = BahdanauAttention(hidden, rngs) if attention else None
        self.dropout = HashedDropout(dropout)

    def output(self, s, enc_outputs, src_mask, rngs=None):
        """LSTM outputs (B,T,H) -> logits (B,T,V) and attention weights (B,T,S) or None."""
        alpha = None
        if self.attention is not None:
            s, alpha = self.attention(s, enc_outputs, src_mask)
        return self.embedding.attend(self.dropout(s, rngs=rngs)), alpha

    def __call__(self, tgt_in, carry, enc_outputs, src_mask, rngs=None):
        """Teacher forcing: ``tgt_in`` (B,T) -> logits (B,T,V), attention (B,T,S) or None."""
        x = self.dropout(self.embedding(tgt_in), rngs=rngs)
        # Steps at PAD inputs output 0: their logits are masked out of the loss either way, and
        # the LSTM's loop stops after the batch's longest word (p2g.lstm.live_steps).
        lengths = jnp.sum(tgt_in != PAD, axis=1)
        _, s = masked_lstm_scan(self.cell, x, lengths, carry)
        return self.output(s, enc_outputs, src_mask, rngs)

    def step(self, token, carry, enc_outputs, src_mask):
        """One decoding step (eval mode): ``token`` (B,) -> logits (B,V), carry, attention (B,S)."""
        carry, s = self.cell(carry, self.embedding(token))
        logits, alpha = self.output(s[:, None, :], enc_outputs, src_mask)
        return logits[:, 0], carry, None if alpha is None else alpha[:, 0]


class Seq2Seq(nnx.Module):
    """Phonemes (B,S) -> character logits (B,T,V) with teacher forcing."""

    def __init__(self, src_vocab: int, tgt_vocab: int, hidden: int = 128, dropout: float = 0.3,
                 attention: bool = False, *, rngs: nnx.Rngs):
        self.encoder = Encoder(src_vocab, hidden, dropout, rngs)
        self.decoder = Decoder(tgt_vocab, hidden, dropout, attention, rngs)

    def __call__(self, src, src_len, tgt_in, rngs: nnx.Rngs | None = None):
        enc_outputs, carry = self.encoder(src, src_len, rngs)
        logits, _ = self.decoder(tgt_in, carry, enc_outputs, src != PAD, rngs)
        return logits


def summed_nll(logits, targets):
    """Sum of the cross-entropy over non-PAD target positions. ``(B,T,V), (B,T) -> ()``."""
    chex.assert_rank([logits, targets], [3, 2])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets != PAD, nll, 0.0))


def sequence_loss(logits, targets):
    """Mean cross-entropy over non-PAD target positions. ``(B,T,V), (B,T) -> ()``."""
    return summed_nll(logits, targets) / jnp.maximum(jnp.sum(targets != PAD), 1)
