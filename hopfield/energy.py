"""The modern Hopfield energy of Ramsauer et al. (2020) and its convex-concave split.

Shapes: a query (state pattern) ``q`` is ``(D,)``; the memory ``X`` is ``(N, D)``, one stored
pattern per row; ``beta > 0`` is the inverse temperature. Every function is pure and can be
``jax.jit``-ed, ``jax.vmap``-ed over queries and differentiated.

    lse(beta, z) = beta^-1 log sum_i exp(beta z_i)                                   (2)
    E(q)  = -lse(beta, X q) + beta^-1 log N + 1/2 q^T q + 1/2 M^2,  M = max_i ||x_i||  (1)
    E1(q) = 1/2 q^T q + beta^-1 log N + 1/2 M^2      (convex)
    E2(q) = -lse(beta, X q)                          (concave)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def lse(z: chex.Array, beta: chex.Numeric) -> chex.Array:
    """Log-sum-exp with temperature 1/beta over the last axis: beta^-1 log sum_i exp(beta z_i).

    Computed as ``max(z) + beta^-1 log sum_i exp(beta (z_i - max z))`` (``jax.nn.logsumexp``),
    so it stays finite for large beta (1e4 and beyond) and large |z|.
    ``z``: ``(..., N)`` -> ``(...)``.
    """
    return jax.nn.logsumexp(beta * z, axis=-1) / beta


def _check(q: chex.Array, X: chex.Array) -> None:
    chex.assert_rank(q, 1)
    chex.assert_rank(X, 2)
    chex.assert_equal(q.shape[0], X.shape[1])


def max_norm(X: chex.Array) -> chex.Array:
    """M = max_i ||x_i||, the largest norm of a stored pattern. ``X``: ``(N, D)`` -> ``()``."""
    return jnp.max(jnp.linalg.norm(X, axis=-1))


def energy_convex(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """E1(q) = 1/2 q^T q + beta^-1 log N + 1/2 M^2 (convex in q). Returns a scalar."""
    _check(q, X)
    n = X.shape[0]
    return 0.5 * q @ q + jnp.log(n) / beta + 0.5 * max_norm(X) ** 2


def energy_concave(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """E2(q) = -lse(beta, X q) (concave in q). Returns a scalar."""
    _check(q, X)
    return -lse(X @ q, beta)


def energy(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """E(q) = E1(q) + E2(q) = -lse(beta, X q) + beta^-1 log N + 1/2 q^T q + 1/2 M^2.

    Bounded below by 0 whenever q lies in the convex hull of the patterns' ball (Ramsauer et al.).
    """
    return energy_convex(q, X, beta) + energy_concave(q, X, beta)
