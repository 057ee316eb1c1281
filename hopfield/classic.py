"""The classic (Hopfield, 1982) binary network, for comparison with the modern one.

    W = X^T X  (D x D, optionally with zero diagonal),   q_{t+1} = sign(W q_t),  q in {-1, +1}^D

sign(0) is taken as +1 so that states stay binary.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


def classic_weights(X: chex.Array, zero_diagonal: bool = True) -> chex.Array:
    """W = X^T X: ``(N, D) -> (D, D)``; the diagonal (self-coupling) is zeroed by default."""
    chex.assert_rank(X, 2)
    W = X.T @ X
    return W - jnp.diag(jnp.diag(W)) if zero_diagonal else W


def binary_sign(x: chex.Array) -> chex.Array:
    """sign with sign(0) = +1, so states stay in {-1, +1}."""
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def classic_step(q: chex.Array, W: chex.Array) -> chex.Array:
    """Synchronous update q -> sign(W q): ``(D,), (D, D) -> (D,)``."""
    return binary_sign(W @ q)


class ClassicRetrieval(NamedTuple):
    q: chex.Array  # (D,) final state
    steps: chex.Array  # () int32 updates applied


def classic_retrieve(q: chex.Array, W: chex.Array, max_steps: int = 100) -> ClassicRetrieval:
    """Iterate ``classic_step`` (``lax.while_loop``) until the state stops changing."""

    def cond(state):
        _, step, changed = state
        return changed & (step < max_steps)

    def body(state):
        q_t, step, _ = state
        q_next = classic_step(q_t, W)
        return q_next, step + 1, jnp.any(q_next != q_t)

    q_star, steps, _ = jax.lax.while_loop(cond, body, (binary_sign(q), jnp.int32(0), jnp.bool_(True)))
    return ClassicRetrieval(q_star, steps)
