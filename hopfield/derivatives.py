"""Analytic gradients and Hessians of the two halves of the Hopfield energy.

With p = softmax(beta X q) (the attention of the query over the N stored patterns):

    grad E1(q)     = q                                       hess E1(q)     = I_D
    grad (-E2)(q)  = X^T p                                   hess (-E2)(q)  = beta X^T (diag(p) - p p^T) X

Both Hessians are PSD: I trivially, and diag(p) - p p^T is the covariance of a one-hot draw
from p, so v^T X^T (diag p - p p^T) X v = Var_{i~p}[(X v)_i] >= 0. These are checked against
``jax.grad`` / ``jax.hessian`` of :mod:`hopfield.energy` in ``tests/`` and in
``python -m experiments.hopfield verify``.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from hopfield.energy import _check, check_beta, softmax


def attention_weights(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """p = softmax(beta X q): ``(D,), (N, D) -> (N,)`` (max subtracted before scaling,
    :func:`hopfield.energy.softmax`); raises ``ValueError`` for beta <= 0."""
    _check(q, X)
    check_beta(beta)
    return softmax(X @ q, beta)


def grad_energy_convex(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """grad E1(q) = q: ``(D,)``."""
    _check(q, X)
    return q


def grad_neg_energy_concave(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """grad (-E2)(q) = X^T softmax(beta X q): ``(D,)``."""
    return X.T @ attention_weights(q, X, beta)


def hessian_energy_convex(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """hess E1(q) = I_D: ``(D, D)``."""
    _check(q, X)
    return jnp.eye(q.shape[0], dtype=q.dtype)


def hessian_neg_energy_concave(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """hess (-E2)(q) = beta X^T (diag(p) - p p^T) X, p = softmax(beta X q): ``(D, D)``.

    Computed in the equal covariance form beta A^T A with A = sqrt(p) * (X - 1 m^T), m = X^T p:
    sum_i p_i (x_i - m)(x_i - m)^T = X^T diag(p) X - m m^T. The Gram form is PSD in floating point
    too and avoids the cancellation of the difference form when p is nearly one-hot (large beta).
    It never forms the N x N matrix.
    """
    p = attention_weights(q, X, beta)
    centred = jnp.sqrt(p)[:, None] * (X - X.T @ p)
    return beta * centred.T @ centred
