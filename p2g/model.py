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

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from p2g.data import PAD
from p2g.dropout import HashedDropout
from p2g.lstm import lstm_layer


class Words(NamedTuple):
    """B token sequences laid end to end: word b is ``tokens[starts[b] : starts[b] + lengths[b]]``.
    ``tokens`` (P,) int (PAD on rows no word covers), ``starts``, ``lengths`` (B,) int. A padded
    (B,W) array is the layout with starts b*W (:func:`padded_words`); training packs the words
    tightly (:func:`p2g.data.pack_words`), so the LSTMs' products skip the padding."""

    tokens: jax.Array
    starts: jax.Array
    lengths: jax.Array


def padded_words(x, lengths) -> Words:
    """The padded (B,W) array ``x`` as :class:`Words` (a reshape, no copy)."""
    B, W = x.shape
    return Words(x.reshape(B * W), jnp.arange(B, dtype=jnp.int32) * W, lengths)


def word_rows(words: Words, width: int):
    """Row of each (word, position) pair, (B, width) int32; P (out of bounds) past a word's end."""
    t = jnp.arange(width)[None, :]
    return jnp.where(t < words.lengths[:, None], words.starts[:, None] + t, words.tokens.shape[0])


def to_padded(values, words: Words, width: int):
    """Rows ``values`` (P,...) laid out as ``words`` -> (B, width, ...), 0 past each word's end."""
    return values.at[word_rows(words, width)].get(mode="fill", fill_value=0)


def from_padded(x, words: Words):
    """The inverse of :func:`to_padded`: (B, W, ...) -> (P, ...), 0 on rows no word covers."""
    B, W = x.shape[:2]
    starts, lengths = jnp.asarray(words.starts), jnp.asarray(words.lengths)
    rows = jnp.arange(words.tokens.shape[0])
    b = jnp.clip(jnp.sum(starts[None, :] <= rows[:, None], axis=1) - 1, 0, B - 1)  # the last word starting at or before
    t = rows - starts[b]
    index = jnp.where((t >= 0) & (t < lengths[b]), b * W + t, B * W)
    return x.reshape((B * W,) + x.shape[2:]).at[index].get(mode="fill", fill_value=0)


def masked_lstm(cell: nnx.OptimizedLSTMCell, inputs, words: Words, carry, reverse: bool = False):
    """Run ``cell`` over each word of ``words`` (``inputs`` (P,D): a row per token), last token
    first with ``reverse``; steps past a word's length leave its carry unchanged. -> (final carry
    at each word's last step, outputs (P,H) at the inputs' rows, 0 on rows no word covers). One
    loop over time with the cell's parameters and a gradient of our own
    (:func:`p2g.lstm.lstm_layer`): the same function as calling ``cell`` step by step."""
    chex.assert_rank([inputs, words.starts, words.lengths], [2, 1, 1])
    chex.assert_equal_shape([words.starts, words.lengths])
    return lstm_layer(reverse, cell.dense_i.kernel[...], cell.dense_h.kernel[...], cell.dense_h.bias[...],
                      inputs, words.starts, words.lengths, carry)


def masked_lstm_scan(cell: nnx.OptimizedLSTMCell, inputs, lengths, carry, reverse: bool = False):
    """:func:`masked_lstm` on a padded batch: ``inputs`` (B,S,D), ``lengths`` (B,) -> (final
    carry, outputs (B,S,H), 0 past each length)."""
    chex.assert_rank([inputs, lengths], [3, 1])
    B, S, D = inputs.shape
    carry, outputs = masked_lstm(cell, inputs.reshape(B * S, D), padded_words(jnp.zeros((B, S)), lengths), carry, reverse)
    return carry, outputs.reshape(B, S, -1)


class Encoder(nnx.Module):
    def __init__(self, vocab_size: int, hidden: int, dropout: float, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab_size, hidden, rngs=rngs)
        self.forward_cell = nnx.OptimizedLSTMCell(hidden, hidden // 2, rngs=rngs)
        self.backward_cell = nnx.OptimizedLSTMCell(hidden, hidden // 2, rngs=rngs)
        self.dropout = HashedDropout(dropout)
        self.half = hidden // 2

    def packed(self, src: Words, rngs: nnx.Rngs | None = None):
        """-> outputs (P,H) at the source tokens' rows, final (c, h) each (B,H)."""
        x = self.dropout(self.embedding(src.tokens), rngs=rngs)
        zeros = jnp.zeros((src.starts.shape[0], self.half), x.dtype)
        (c_f, h_f), out_f = masked_lstm(self.forward_cell, x, src, (zeros, zeros))
        (c_b, h_b), out_b = masked_lstm(self.backward_cell, x, src, (zeros, zeros), reverse=True)
        outputs = jnp.concatenate([out_f, out_b], axis=-1)
        final = (jnp.concatenate([c_f, c_b], -1), jnp.concatenate([h_f, h_b], -1))  # (c, h) as the cell's carry
        return self.dropout(outputs, rngs=rngs), final

    def __call__(self, src, src_len, rngs: nnx.Rngs | None = None):
        """``src`` (B,S) int, ``src_len`` (B,) -> outputs (B,S,H), final (h, c) each (B,H)."""
        chex.assert_rank([src, src_len], [2, 1])
        outputs, final = self.packed(padded_words(src, src_len), rngs)
        return outputs.reshape(src.shape + (-1,)), final


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

    def packed(self, tgt_in: Words, carry, enc_outputs=None, src_mask=None, width: int | None = None, rngs=None):
        """Teacher forcing on packed decoder inputs -> logits (P,V) at their rows. With attention,
        ``enc_outputs`` (B,S,H) and ``src_mask`` (B,S) as in :meth:`output`, and the states are
        laid out (B, ``width``, H) for it (``width`` >= the longest word)."""
        x = self.dropout(self.embedding(tgt_in.tokens), rngs=rngs)
        _, s = masked_lstm(self.cell, x, tgt_in, carry)
        if self.attention is None:
            return self.embedding.attend(self.dropout(s, rngs=rngs))
        s, _ = self.attention(to_padded(s, tgt_in, width), enc_outputs, src_mask)
        return self.embedding.attend(self.dropout(from_padded(s, tgt_in), rngs=rngs))

    def __call__(self, tgt_in, carry, enc_outputs, src_mask, rngs=None):
        """Teacher forcing: ``tgt_in`` (B,T) -> logits (B,T,V), attention (B,T,S) or None."""
        x = self.dropout(self.embedding(tgt_in), rngs=rngs)
        # Steps at PAD inputs output 0: their logits are masked out of the loss either way.
        _, s = masked_lstm_scan(self.cell, x, jnp.sum(tgt_in != PAD, axis=1), carry)
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

    def packed(self, src: Words, tgt_in: Words, widths: tuple[int, int] | None = None, rngs: nnx.Rngs | None = None):
        """Teacher forcing on packed words (training) -> logits (P_tgt, V) at the rows of
        ``tgt_in``. Attention needs ``widths`` (S, T) >= the longest source and target."""
        enc_outputs, carry = self.encoder.packed(src, rngs)
        if self.decoder.attention is None:
            return self.decoder.packed(tgt_in, carry, rngs=rngs)
        S, T = widths
        src_mask = jnp.arange(S)[None, :] < src.lengths[:, None]
        return self.decoder.packed(tgt_in, carry, to_padded(enc_outputs, src, S), src_mask, T, rngs)

    def __call__(self, src, src_len, tgt_in, rngs: nnx.Rngs | None = None):
        """Padded batches: ``src`` (B,S), ``src_len`` (B,), ``tgt_in`` (B,T) -> logits (B,T,V)."""
        enc_outputs, carry = self.encoder(src, src_len, rngs)
        logits, _ = self.decoder(tgt_in, carry, enc_outputs, src != PAD, rngs)
        return logits


def summed_nll(logits, targets):
    """Sum of the cross-entropy over non-PAD target positions. ``(...,V), (...) -> ()``."""
    chex.assert_equal(logits.ndim, targets.ndim + 1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets != PAD, nll, 0.0))


def sequence_loss(logits, targets):
    """Mean cross-entropy over non-PAD target positions. ``(B,T,V), (B,T) -> ()``."""
    return summed_nll(logits, targets) / jnp.maximum(jnp.sum(targets != PAD), 1)
