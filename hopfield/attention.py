"""Single-head cross-attention and its identity with one CCCP step.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V                  Q: (M, D), K: (N, D), V: (N, Dv)

With identity projections W_Q = W_K = W_V = I, keys = values = X and beta = 1/sqrt(D), row m of
Attention(Q, X, X) is X^T softmax(beta X q_m) = cccp_step(q_m, X, beta): one Hopfield update
of every query at once.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from hopfield.energy import check_beta, softmax


def cross_attention(Q: chex.Array, K: chex.Array, V: chex.Array) -> chex.Array:
    """softmax(Q K^T / sqrt(D)) V: ``(M, D), (N, D), (N, Dv) -> (M, Dv)``."""
    chex.assert_rank([Q, K, V], 2)
    chex.assert_equal(Q.shape[1], K.shape[1])
    chex.assert_equal(K.shape[0], V.shape[0])
    return softmax(Q @ K.T, 1.0 / jnp.sqrt(jnp.asarray(Q.shape[1], Q.dtype))) @ V


def cccp_step_batch(Q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """``cccp_step`` over the rows of Q: softmax(beta Q X^T) X, ``(M, D), (N, D) -> (M, D)``.

    Row m is X^T softmax(beta X q_m) = ``cccp_step(q_m, X, beta)`` (tested against it). Written
    as two matrix products rather than ``vmap`` of the per-query gradient, which XLA:CPU runs
    slower. The max of each row of scores is subtracted before beta scales them
    (:func:`hopfield.energy.softmax`). Raises ``ValueError`` for beta <= 0.
    """
    chex.assert_rank([Q, X], 2)
    chex.assert_equal(Q.shape[1], X.shape[1])
    check_beta(beta)
    return softmax(Q @ X.T, beta) @ X


def jax_attention(Q: chex.Array, X: chex.Array) -> chex.Array:
    """``jax.nn.dot_product_attention`` with identity projections, keys = values = X.

    JAX's layout is (batch, length, heads, head_dim); one batch, one head. ``(M, D) -> (M, D)``.
    """
    out = jax.nn.dot_product_attention(Q[None, :, None, :], X[None, :, None, :], X[None, :, None, :])
    return out[0, :, 0, :]
