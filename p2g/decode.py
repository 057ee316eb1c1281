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
    """
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p  # a token is in V(p) if the mass before it falls short of p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
    kept = jnp.where(keep, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


class Decoded(NamedTuple):
    tokens: jax.Array  # (B, max_len) int32, EOS then PAD after the end
    attention: jax.Array  # (B, max_len, S) attention weights (zeros without attention)


def decode(model: Seq2Seq, src, src_len, max_len: int = 50, top_p: float | None = None, key=None) -> Decoded:
    """Greedy (``top_p`` None: argmax at every step) or nucleus sampling with PRNG ``key``."""
    enc_outputs, carry = model.encoder(src, src_len)
    src_mask = src != PAD
    B, S = src.shape
    tokens = jnp.full((B, max_len), PAD, jnp.int32)
    attention = jnp.zeros((B, max_len, S), enc_outputs.dtype)
    key = jax.random.key(0) if key is None else key

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_len) & ~jnp.all(done)

    def body(state):
        t, token, carry, done, tokens, attention = state
        logits, carry, alpha = model.decoder.step(token, carry, enc_outputs, src_mask)
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
