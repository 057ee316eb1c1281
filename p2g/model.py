"""The homework's recurrent encoder-decoder for P2G (Question 3), in Flax NNX.

Shapes: B batch, S source length, T target length, H hidden size (128), V vocabulary.

Encoder: embed (B,S)->(B,S,H) -> dropout -> BiLSTM, H/2 per direction, over each word's length
-> outputs (B,S,H), 0 past the length -> dropout; final state (c, h) = ([c_fwd; c_bwd], [h_fwd;
h_bwd]), each (B,H).
Decoder: embed -> dropout -> LSTM(H) started from the encoder's final state -> outputs s_t
-> [attention] -> dropout -> logits = out E^T (the generator is tied to the decoder embedding).
Bahdanau attention over the encoder outputs h_i (PAD positions masked out), or a Hopfield layer
in its place (:class:`HopfieldAttention`):

    e_ti = v^T tanh(W_s s_t + W_h h_i),   a_t = softmax(e_t),   c_t = sum_i a_ti h_i,
    s~_t = tanh(W_out [c_t; s_t])

As in the homework, attention changes each step's output and is not fed back into the LSTM, so
with teacher forcing the LSTM runs over all steps first and attention is applied to every step
at once; decoding (:mod:`p2g.decode`) runs the same functions one step at a time.

``impl="reference"`` (the default): the LSTMs are ``nnx.RNN`` scans over ``nnx.OptimizedLSTMCell``
(the encoder's through ``nnx.Bidirectional``) with ``seq_lengths``, dropout is ``nnx.Dropout``,
gradients by autodiff. ``impl="xla_cpu"``: the LSTM layer and dropout of :mod:`p2g.xla_cpu`
(a written-out LSTM gradient, hashed dropout masks), passed in as modules; same parameters
(paths, shapes, initial values), same function.

``dtype``: what the layers compute in (None: their float32 parameters'; ``jnp.bfloat16``: mixed
precision, :mod:`common.precision`): embeddings, LSTMs (their carries too) and attention in that
dtype from float32 parameters; the attention softmax and the logits (hence the loss and decoding's
softmax) in float32. The Hopfield attention has no bfloat16 path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common.precision import at_least_float32
from p2g.data import PAD

IMPLS = ("reference", "xla_cpu")


def lstm(cell: nnx.RNNCellBase) -> nnx.RNN:
    """The reference LSTM layer: ``nnx.RNN`` scanning ``cell`` over time (no RNG state of its own)."""
    return nnx.RNN(cell, rngs=False)


@dataclass(frozen=True)
class Layers:
    """What an implementation builds the model from."""

    rnn: Callable[[nnx.RNNCellBase], nnx.Module]  # an nnx.RNN-like layer over a cell
    dropout: type[nnx.Module]  # called as dropout(rate), then dropout(x, rngs=...)


REFERENCE = Layers(rnn=lstm, dropout=nnx.Dropout)


def layers(impl: str) -> Layers:
    """The layer set of ``impl`` ("reference" or "xla_cpu"); raises ``ValueError`` for any other."""
    if impl == "reference":
        return REFERENCE
    if impl == "xla_cpu":
        from p2g.xla_cpu import LAYERS

        return LAYERS
    raise ValueError(f"unknown P2G implementation {impl!r}; expected one of {IMPLS}")


def length_mask(lengths, width: int):
    """(B,) lengths -> (B, width) bool, True at positions before each length."""
    return jnp.arange(width)[None, :] < lengths[:, None]


def bidirectional(parts: Layers, hidden: int, rngs: nnx.Rngs, dtype=None) -> nnx.Bidirectional:
    """A BiLSTM layer, ``hidden`` inputs and H/2 = ``hidden // 2`` units per direction."""
    forward = parts.rnn(nnx.OptimizedLSTMCell(hidden, hidden // 2, dtype=dtype, rngs=rngs))
    backward = parts.rnn(nnx.OptimizedLSTMCell(hidden, hidden // 2, dtype=dtype, rngs=rngs))
    return nnx.Bidirectional(forward, backward, rngs=False)


class Encoder(nnx.Module):
    """``num_layers`` stacked BiLSTM layers (1: the homework's), dropout before and after each;
    the decoder starts from the last layer's final state."""

    def __init__(self, vocab_size: int, hidden: int, dropout: float, rngs: nnx.Rngs, impl: str = "reference",
                 dtype=None, num_layers: int = 1):
        parts = layers(impl)
        self.embedding = nnx.Embed(vocab_size, hidden, dtype=dtype, rngs=rngs)
        self.rnn = bidirectional(parts, hidden, rngs, dtype)
        # layers 2..L (None for one: the homework's parameters, and its checkpoints' tree, unchanged)
        self.stacked = nnx.List([bidirectional(parts, hidden, rngs, dtype) for _ in range(num_layers - 1)]) if num_layers > 1 else None
        self.dropout = parts.dropout(dropout)
        self.half = hidden // 2

    def __call__(self, src, src_len, rngs: nnx.Rngs | None = None):
        """``src`` (B,S) int, ``src_len`` (B,) -> outputs (B,S,H) (0 past each length), final
        (c, h) each (B,H), the decoder LSTM's initial carry."""
        chex.assert_rank([src, src_len], [2, 1])
        x = self.dropout(self.embedding(src), rngs=rngs)
        zeros = jnp.zeros((src.shape[0], self.half), x.dtype)  # both directions start from (c, h) = 0
        for k, rnn in enumerate([self.rnn, *(self.stacked or ())]):
            if k:
                x = self.dropout(x, rngs=rngs)
            ((c_f, h_f), (c_b, h_b)), x = rnn(x, initial_carry=((zeros, zeros), (zeros, zeros)),
                                              seq_lengths=src_len, return_carry=True)
            x = jnp.where(length_mask(src_len, src.shape[1])[..., None], x, 0.0)
        final = (jnp.concatenate([c_f, c_b], -1), jnp.concatenate([h_f, h_b], -1))
        return self.dropout(x, rngs=rngs), final


class BahdanauAttention(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs, dtype=None):
        self.W_s = nnx.Linear(hidden, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.W_h = nnx.Linear(hidden, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(hidden, 1, use_bias=False, dtype=dtype, rngs=rngs)
        self.W_out = nnx.Linear(2 * hidden, hidden, use_bias=False, dtype=dtype, rngs=rngs)

    def weights(self, s, keys, src_mask):
        """Attention weights (B,T,S) of decoder states ``s`` (B,T,H) over encoder outputs
        ``keys`` (B,S,H); PAD positions (``src_mask`` False) get weight 0. The softmax is in
        float32 at least."""
        scores = self.v(jnp.tanh(self.W_s(s)[:, :, None, :] + self.W_h(keys)[:, None, :, :]))[..., 0]
        return jax.nn.softmax(jnp.where(src_mask[:, None, :], at_least_float32(scores), -jnp.inf), axis=-1)

    def __call__(self, s, keys, src_mask):
        """s~ = tanh(W_out [c; s]): (B,T,H) in ``keys``' dtype, and the weights (B,T,S)."""
        alpha = self.weights(s, keys, src_mask)
        context = jnp.einsum("bts,bsh->bth", alpha.astype(keys.dtype), keys)
        return jnp.tanh(self.W_out(jnp.concatenate([context, s], axis=-1))), alpha


class HopfieldAttention(nnx.Module):
    """Attention whose scorer is a Hopfield layer (:class:`hopfield.layers.Hopfield`, one head):
    the decoder states are the state patterns, the encoder outputs the stored patterns (PAD
    positions masked out), and ``update_steps`` CCCP updates retrieve the context:

        c_t = Hopfield(s_t; h_1 .. h_S),   s~_t = tanh(W_out [c_t; s_t])

    With one update step this is one-head scaled dot-product attention over LayerNorm-ed,
    projected patterns (the homework's Question 1 identity)."""

    def __init__(self, hidden: int, update_steps: int, rngs: nnx.Rngs):
        from hopfield.layers import Hopfield

        self.hopfield = Hopfield(hidden, update_steps=update_steps, rngs=rngs)
        self.W_out = nnx.Linear(2 * hidden, hidden, use_bias=False, rngs=rngs)

    def __call__(self, s, keys, src_mask):
        """s~ (B,T,H) and the weights (B,T,S), as :class:`BahdanauAttention`."""
        context, weights = self.hopfield(s, keys, mask=src_mask, return_weights=True)
        return jnp.tanh(self.W_out(jnp.concatenate([context, s], axis=-1))), weights[:, 0]


ATTENTIONS = ("bahdanau", "hopfield")


def attention_kind(attention: bool | str | None) -> str | None:
    """False / None: no attention; True or "bahdanau": Bahdanau's; "hopfield": a Hopfield layer.
    Raises ``ValueError`` for anything else."""
    if attention is None or attention is False:
        return None
    if attention is True:
        return "bahdanau"
    if attention in ATTENTIONS:
        return attention
    raise ValueError(f"unknown attention {attention!r}; expected False, True or one of {ATTENTIONS}")


class Decoder(nnx.Module):
    def __init__(self, vocab_size: int, hidden: int, dropout: float, attention: bool | str, rngs: nnx.Rngs,
                 impl: str = "reference", hopfield_steps: int = 1, dtype=None):
        parts = layers(impl)
        kind = attention_kind(attention)
        if kind == "hopfield" and dtype is not None:
            raise ValueError("the Hopfield attention computes in its parameters' dtype: it takes no dtype "
                             "(no bfloat16 path)")
        self.embedding = nnx.Embed(vocab_size, hidden, dtype=dtype, rngs=rngs)
        self.rnn = parts.rnn(nnx.OptimizedLSTMCell(hidden, hidden, dtype=dtype, rngs=rngs))
        self.attention = (None if kind is None else BahdanauAttention(hidden, rngs, dtype) if kind == "bahdanau"
                          else HopfieldAttention(hidden, hopfield_steps, rngs))
        self.dropout = parts.dropout(dropout)

    def output(self, s, enc_outputs, src_mask, rngs=None):
        """LSTM outputs (B,T,H) -> logits (B,T,V), float32 at least, and attention weights (B,T,S)
        or None."""
        alpha = None
        if self.attention is not None:
            s, alpha = self.attention(s, enc_outputs, src_mask)
        return at_least_float32(self.embedding.attend(self.dropout(s, rngs=rngs))), alpha

    def __call__(self, tgt_in, carry, enc_outputs, src_mask, rngs=None):
        """Teacher forcing: ``tgt_in`` (B,T) -> logits (B,T,V), attention (B,T,S) or None. Steps
        at PAD inputs output 0 (their logits are masked out of the loss)."""
        chex.assert_rank(tgt_in, 2)
        x = self.dropout(self.embedding(tgt_in), rngs=rngs)
        lengths = jnp.sum(tgt_in != PAD, axis=1)
        s = self.rnn(x, initial_carry=carry, seq_lengths=lengths)
        s = jnp.where(length_mask(lengths, tgt_in.shape[1])[..., None], s, 0.0)
        return self.output(s, enc_outputs, src_mask, rngs)

    def step(self, token, carry, enc_outputs, src_mask):
        """One decoding step (eval mode): ``token`` (B,) -> logits (B,V), carry, attention (B,S)."""
        carry, s = self.rnn.cell(carry, self.embedding(token))
        logits, alpha = self.output(s[:, None, :], enc_outputs, src_mask)
        return logits[:, 0], carry, None if alpha is None else alpha[:, 0]


class Seq2Seq(nnx.Module):
    """Phonemes (B,S) -> character logits (B,T,V) with teacher forcing. ``attention``: False,
    True (Bahdanau's) or "hopfield" (:class:`HopfieldAttention` with ``hopfield_steps`` CCCP
    updates); ``impl`` picks the layer set and ``dtype`` the computation's dtype (module docstring);
    ``encoder_layers`` stacks BiLSTM layers (1: the homework's encoder). Raises ``ValueError`` for an
    unknown ``impl`` or ``attention``, for the Hopfield attention with a ``dtype`` and for
    ``encoder_layers`` < 1."""

    def __init__(self, src_vocab: int, tgt_vocab: int, hidden: int = 128, dropout: float = 0.3,
                 attention: bool | str = False, *, rngs: nnx.Rngs, impl: str = "reference", hopfield_steps: int = 1,
                 dtype=None, encoder_layers: int = 1):
        if encoder_layers < 1:
            raise ValueError(f"encoder_layers must be a positive integer, got {encoder_layers}")
        self.impl = impl
        self.encoder = Encoder(src_vocab, hidden, dropout, rngs, impl, dtype, encoder_layers)
        self.decoder = Decoder(tgt_vocab, hidden, dropout, attention, rngs, impl, hopfield_steps, dtype)

    def __call__(self, src, src_len, tgt_in, rngs: nnx.Rngs | None = None):
        """Padded batches: ``src`` (B,S), ``src_len`` (B,), ``tgt_in`` (B,T) -> logits (B,T,V)."""
        enc_outputs, carry = self.encoder(src, src_len, rngs)
        logits, _ = self.decoder(tgt_in, carry, enc_outputs, src != PAD, rngs)
        return logits


def summed_nll(logits, targets, label_smoothing: float = 0.0):
    """Sum of the cross-entropy (optax's, of integer labels) over non-PAD target positions.
    ``(...,V), (...) -> ()``. ``label_smoothing`` alpha > 0: against (1 - alpha) one_hot + alpha / V
    (``optax.smooth_labels``)."""
    chex.assert_equal(logits.ndim, targets.ndim + 1)
    if label_smoothing:
        smoothed = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), label_smoothing)
        nll = optax.softmax_cross_entropy(logits, smoothed)
    else:
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(targets != PAD, nll, 0.0))


def sequence_loss(logits, targets, label_smoothing: float = 0.0):
    """Mean cross-entropy over non-PAD target positions. ``(B,T,V), (B,T) -> ()``;
    ``label_smoothing``: :func:`summed_nll`'s."""
    return summed_nll(logits, targets, label_smoothing) / jnp.maximum(jnp.sum(targets != PAD), 1)
