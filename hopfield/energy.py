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
import numpy as np


def check_beta(beta: chex.Numeric) -> None:
    """Raise ``ValueError`` unless beta > 0 and finite (checked where beta is a concrete value;
    a traced beta, e.g. under ``vmap`` over betas, is the caller's to keep positive)."""
    if isinstance(beta, jax.core.Tracer):
        return
    values = np.asarray(beta)
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(f"beta must be positive and finite, got {beta}")


def _shifted(z: chex.Array) -> tuple[chex.Array, chex.Array]:
    """(max z, z - max z) over the last axis, the max held constant under autodiff (the shift
    cancels exactly in every derivative)."""
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return top, z - top


def lse(z: chex.Array, beta: chex.Numeric) -> chex.Array:
    """Log-sum-exp with temperature 1/beta over the last axis: beta^-1 log sum_i exp(beta z_i).

    Computed as ``max(z) + beta^-1 log sum_i exp(beta (z_i - max z))``: the max is subtracted
    before beta scales anything, so every exponent is <= 0 and the result stays finite for large
    beta and large |z| (also in float32 under ``jit``, however XLA rounds ``beta z``).
    ``z``: ``(..., N)`` -> ``(...)``.
    """
    top, shifted = _shifted(z)
    return top[..., 0] + jnp.log(jnp.sum(jnp.exp(beta * shifted), axis=-1)) / beta


def softmax(z: chex.Array, beta: chex.Numeric) -> chex.Array:
    """softmax(beta z) over the last axis, the gradient of :func:`lse`: the max subtracted before
    scaling, as in :func:`lse`. ``z``: ``(..., N)`` -> ``(..., N)``."""
    return jax.nn.softmax(beta * _shifted(z)[1], axis=-1)


def _check(q: chex.Array, X: chex.Array) -> None:
    chex.assert_rank(q, 1)
    chex.assert_rank(X, 2)
    chex.assert_equal(q.shape[0], X.shape[1])


def max_norm(X: chex.Array) -> chex.Array:
    """M = max_i ||x_i||, the largest norm of a stored pattern. ``X``: ``(N, D)`` -> ``()``."""
    return jnp.max(jnp.linalg.norm(X, axis=-1))


def energy_convex(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """E1(q) = 1/2 q^T q + beta^-1 log N + 1/2 M^2 (convex in q). Returns a scalar; raises
    ``ValueError`` for beta <= 0."""
    _check(q, X)
    check_beta(beta)
    n = X.shape[0]
    return 0.5 * q @ q + jnp.log(n) / beta + 0.5 * max_norm(X) ** 2


def energy_concave(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """E2(q) = -lse(beta, X q) (concave in q). Returns a scalar; raises ``ValueError`` for beta <= 0."""
    _check(q, X)
    check_beta(beta)
    return -lse(X @ q, beta)


def energy(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """E(q) = E1(q) + E2(q) = -lse(beta, X q) + beta^-1 log N + 1/2 q^T q + 1/2 M^2.

    Bounded below by 0 whenever q lies in the convex hull of the patterns' ball (Ramsauer et al.).
    """
    return energy_convex(q, X, beta) + energy_concave(q, X, beta)
