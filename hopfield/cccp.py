"""The convex-concave procedure (CCCP) for the Hopfield energy: retrieval as attention.

Linearising E2 at q_t and minimising E1(q) + E2(q_t) + grad E2(q_t)^T (q - q_t) gives
grad E1(q_{t+1}) = -grad E2(q_t), i.e.

    q_{t+1} = X^T softmax(beta X q_t)                                                    (3)

Each step cannot increase E (Yuille & Rangarajan, 2003): E(q_{t+1}) <= E(q_t).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from hopfield.derivatives import grad_neg_energy_concave
from hopfield.energy import energy


def cccp_step(q: chex.Array, X: chex.Array, beta: chex.Numeric) -> chex.Array:
    """One CCCP update q -> X^T softmax(beta X q): ``(D,), (N, D) -> (D,)``."""
    return grad_neg_energy_concave(q, X, beta)


class Retrieval(NamedTuple):
    """Result of :func:`cccp_retrieve`.

    q: ``(D,)`` the last state; steps: ``()`` int32, updates applied;
    energies: ``(max_steps + 1,)`` E(q_0), E(q_1), ..., NaN after the last step taken;
    converged: ``()`` bool, whether the last update moved q by less than ``tol`` with q and its
    energy finite (a non-finite state stops the loop and is never reported as converged).
    """

    q: chex.Array
    steps: chex.Array
    energies: chex.Array
    converged: chex.Array


def cccp_retrieve(
    q: chex.Array,
    X: chex.Array,
    beta: chex.Numeric,
    max_steps: int = 100,
    tol: float = 1e-6,
) -> Retrieval:
    """Iterate (3) with ``lax.while_loop`` until ||q_{t+1} - q_t|| < tol or ``max_steps`` updates.

    ``max_steps`` is static (it sizes the energy trajectory); ``tol`` and ``beta`` may be traced,
    so the function ``vmap``s over queries and betas.
    """
    chex.assert_rank(q, 1)
    energies = jnp.full((max_steps + 1,), jnp.nan, dtype=q.dtype)
    energies = energies.at[0].set(energy(q, X, beta))

    def cond(state):
        _, step, delta, _ = state
        return (step < max_steps) & (delta >= tol)  # a NaN delta (non-finite state) stops too

    def body(state):
        q_t, step, _, trajectory = state
        q_next = cccp_step(q_t, X, beta)
        trajectory = trajectory.at[step + 1].set(energy(q_next, X, beta))
        return q_next, step + 1, jnp.linalg.norm(q_next - q_t), trajectory

    init = (q, jnp.int32(0), jnp.asarray(jnp.inf, dtype=q.dtype), energies)
    q_star, steps, delta, energies = jax.lax.while_loop(cond, body, init)
    finite = jnp.all(jnp.isfinite(q_star)) & jnp.isfinite(energies[steps])
    return Retrieval(q_star, steps, energies, (delta < tol) & finite)
