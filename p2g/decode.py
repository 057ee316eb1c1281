"""Batched decoding under jit: greedy and nucleus (top-p) sampling, to at most ``max_len`` steps.

Both run one ``lax.while_loop`` over time for a whole batch, stopping once every sequence has
produced EOS (later positions are PAD). The model must be in eval mode (no dropout).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from p2g.data import EOS, PAD, SOS
from p2g.model import Seq2Seq


def nucleus_probabilities(probs: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of most probable tokens whose mass reaches ``top_p``, renormalised.

    V(p) = the top-k tokens, k the least with sum of the k largest >= p;
    P'(x) = P(x) / sum_{V(p)} P  for x in V(p), 0 otherwise.  ``(..., V) -> (..., V)``.
    V(p) always holds the most probable token (for p in (0, 1]; the CLI refuses other p), and
    V(1) every token: p = 1 is plain sampling.
    """
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # a token is in V(p) if the mass before it falls short of p; the most probable one always is.
    # p >= 1 keeps every token outright: the float32 running sum reaches 1 before the last tokens
    # of a peaked distribution, which the comparison alone would cut.
    keep_sorted = (mass_before < top_p) | (jnp.arange(probs.shape[-1]) == 0) | (top_p >= 1.0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
    kept = jnp.where(keep, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def allowed_logits(logits: jax.Array) -> jax.Array:
    """PAD and SOS are never generated: their logits become -inf. ``(..., V)``."""
    return logits.at[..., PAD].set(-jnp.inf).at[..., SOS].set(-jnp.inf)


class Decoded(NamedTuple):
    tokens: jax.Array  # (B, max_len) int32, EOS then PAD after the end
    attention: jax.Array  # (B, max_len, S) attention weights (zeros without attention)


def decode(model: Seq2Seq, src, src_len, max_len: int = 50, top_p: float | None = None, key=None) -> Decoded:
    """Greedy (``top_p`` None: argmax at every step) or nucleus sampling with PRNG ``key``;
    PAD and SOS are never produced."""
    enc_outputs, carry = model.encoder(src, src_len)
    src_mask = src != PAD
    B, S = src.shape
    tokens = jnp.full((B, max_len), PAD, jnp.int32)
    attention = jnp.zeros((B, max_len, S), jnp.promote_types(enc_outputs.dtype, jnp.float32))  # the weights' dtype
    key = jax.random.key(0) if key is None else key

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_len) & ~jnp.all(done)

    def body(state):
        t, token, carry, done, tokens, attention = state
        logits, carry, alpha = model.decoder.step(token, carry, enc_outputs, src_mask)
        logits = allowed_logits(logits)
        if top_p is None:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            probs = nucleus_probabilities(jax.nn.softmax(logits, axis=-1), top_p)
            nxt = jax.random.categorical(jax.random.fold_in(key, t), jnp.log(probs), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, PAD, nxt)
        tokens = tokens.at[:, t].set(nxt)
        if alpha is not None:
            attention = attention.at[:, t].set(jnp.where(done[:, None], 0.0, alpha))
        return t + 1, nxt, carry, done | (nxt == EOS), tokens, attention

    state = (jnp.int32(0), jnp.full((B,), SOS, jnp.int32), carry, jnp.zeros((B,), bool), tokens, attention)
    _, _, _, _, tokens, attention = jax.lax.while_loop(cond, body, state)
    return Decoded(tokens, attention)


def length_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
    """GNMT's length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al., 2016), elementwise.
    ``alpha`` 0 gives 1 (plain summed log-probabilities)."""
    return ((5.0 + lengths) / 6.0) ** alpha


def beam_search(model: Seq2Seq, src, src_len, width: int, max_len: int = 50, alpha: float = 0.0) -> jax.Array:
    """Beam search of ``width`` hypotheses per word; returns the best (B, max_len) tokens.

    A hypothesis' log-probability is summed (renormalised without PAD and SOS, as in greedy
    decoding) up to and including EOS; a finished one is carried on unchanged (extended by PAD at
    no cost). Hypotheses are ranked, when pruning and at the end, by log P(Y) / lp(Y) with GNMT's
    :func:`length_penalty` of ``alpha`` and |Y| the tokens produced, EOS included: ``alpha`` 0
    ranks by the plain sum, which favours short (even empty) words; larger ``alpha`` favours
    longer ones. One ``lax.while_loop`` over time for the whole batch, stopping when every beam
    has finished. Width 1 is greedy decoding, whatever ``alpha``.
    """
    enc_outputs, carry = model.encoder(src, src_len)
    B, S = src.shape
    W = width
    repeat = lambda x: jnp.repeat(x, W, axis=0)  # (B, ...) -> (B*W, ...), beams of a word adjacent
    enc_outputs, src_mask = repeat(enc_outputs), repeat(src != PAD)
    carry = jax.tree.map(repeat, carry)
    scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (W - 1)), (B, 1))  # one live beam at the start
    tokens = jnp.full((B, W, max_len), PAD, jnp.int32)
    finished = jnp.zeros((B, W), bool)
    lengths = jnp.zeros((B, W), jnp.float32)  # tokens produced, EOS included

    def cond(state):
        t, _, _, _, finished, _, _ = state
        return (t < max_len) & ~jnp.all(finished)

    def body(state):
        t, token, carry, scores, finished, tokens, lengths = state
        logits, carry, _ = model.decoder.step(token, carry, enc_outputs, src_mask)
        logp = jax.nn.log_softmax(allowed_logits(logits)).reshape(B, W, -1)
        V = logp.shape[-1]
        pad_only = jnp.full((V,), -jnp.inf).at[PAD].set(0.0)
        logp = jnp.where(finished[..., None], pad_only, logp)
        candidates = (scores[..., None] + logp).reshape(B, W * V)
        grown = jnp.repeat(jnp.where(finished, lengths, lengths + 1), V, axis=1)  # (B, W*V)
        _, flat = jax.lax.top_k(candidates / length_penalty(grown, alpha), W)
        scores, lengths = jnp.take_along_axis(candidates, flat, axis=1), jnp.take_along_axis(grown, flat, axis=1)
        parent, nxt = flat // V, (flat % V).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, t].set(nxt)
        finished = jnp.take_along_axis(finished, parent, axis=1) | (nxt == EOS)
        rows = (parent + jnp.arange(B)[:, None] * W).reshape(-1)
        carry = jax.tree.map(lambda c: c[rows], carry)
        return t + 1, nxt.reshape(-1), carry, scores, finished, tokens, lengths

    state = (jnp.int32(0), jnp.full((B * W,), SOS, jnp.int32), carry, scores, finished, tokens, lengths)
    _, _, _, scores, _, tokens, lengths = jax.lax.while_loop(cond, body, state)
    return tokens[jnp.arange(B), jnp.argmax(scores / length_penalty(lengths, alpha), axis=1)]
