"""Randomised verification of the analytic derivatives, PSD-ness, CCCP descent and the attention identity.

Problems are drawn on a grid of shapes (N, D); for each shape ``trials`` queries, memories and
betas (log-uniform in [beta_min, beta_max]) are checked at once under ``jax.vmap``, so each check
compiles once per shape. Each check reports one figure: the largest relative error against
autodiff, the smallest Hessian eigenvalue, the largest energy increase along CCCP, the largest
attention mismatch. Run it in float64 (``jax.config.update("jax_enable_x64", True)``) for the
1e-10 tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from hopfield.attention import cross_attention, jax_attention
from hopfield.cccp import cccp_retrieve, cccp_step
from hopfield.derivatives import (
    grad_energy_convex,
    grad_neg_energy_concave,
    hessian_energy_convex,
    hessian_neg_energy_concave,
)
from hopfield.energy import energy_concave, energy_convex

SHAPES = ((1, 1), (1, 7), (3, 2), (8, 16), (16, 5), (64, 32), (200, 3))


@dataclass(frozen=True)
class Check:
    name: str
    value: float  # the measured figure
    bound: float  # pass when value <= bound (or >= bound when `at_least`)
    at_least: bool = False
    note: str = ""

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.bound if self.at_least else self.value <= self.bound


def relative_error(approx, exact, scale=None):
    """max |approx - exact| / scale, with scale = max |exact| unless given; 0 where both are zero.

    A result that is a difference or a convex combination of larger terms (the Hessian of -E2, an
    attention output) is measured against the size of those terms, passed as ``scale``: round-off
    is relative to them, not to a result that may cancel to ~0.
    """
    approx, exact = jnp.asarray(approx), jnp.asarray(exact)
    diff = jnp.max(jnp.abs(approx - exact))
    if scale is None:
        scale = jnp.max(jnp.abs(exact))
    return jnp.where(scale > 0, diff / jnp.where(scale > 0, scale, 1), jnp.where(diff > 0, jnp.inf, 0.0))


def _neg_energy_concave(q, X, beta):
    return -energy_concave(q, X, beta)


def _per_problem(q, X, beta, Q, cccp_steps):
    """All figures for one problem; vmapped over problems by :func:`run_checks`."""
    h1 = hessian_energy_convex(q, X, beta)
    h2 = hessian_neg_energy_concave(q, X, beta)
    tiny = jnp.finfo(q.dtype).tiny

    def min_eig(h):  # smallest eigenvalue relative to the matrix's scale, so round-off reads as ~ -eps
        return jnp.min(jnp.linalg.eigvalsh(h)) / jnp.maximum(jnp.max(jnp.abs(h)), tiny)

    energies = cccp_retrieve(q, X, beta, max_steps=cccp_steps, tol=0.0).energies
    # Every term of E is at most M^2 + |q_0|^2 + log(N)/beta in size along the trajectory
    # (|lse| <= M |q| + log(N)/beta and |q_t| <= M after one step), so round-off in E is relative
    # to that; at small beta, lse and log(N)/beta are both large and cancel.
    energy_scale = 1.0 + jnp.max(jnp.sum(X * X, axis=-1)) + q @ q + jnp.log(X.shape[0]) / beta
    rises = (energies[1:] - energies[:-1]) / energy_scale
    # -E2's Hessian is beta (X^T diag(p) X - m m^T); when p is nearly one-hot (large beta) the two
    # terms cancel to ~0, so errors are measured against the first term's size.
    p = jax.nn.softmax(beta * (X @ q))
    h2_scale = beta * jnp.max(jnp.abs((X * p[:, None]).T @ X))
    # An attention output is a convex combination of the rows of X: errors relative to max |X|.
    x_scale = jnp.max(jnp.abs(X))
    # one CCCP step per query, from the gradient form (cccp_step), against the two attentions
    hop = jax.vmap(cccp_step, in_axes=(0, None, None))(Q, X, 1.0 / jnp.sqrt(jnp.asarray(X.shape[1], X.dtype)))
    return {
        "g1": relative_error(grad_energy_convex(q, X, beta), jax.grad(energy_convex)(q, X, beta)),
        "g2": relative_error(grad_neg_energy_concave(q, X, beta), jax.grad(_neg_energy_concave)(q, X, beta)),
        "h1": relative_error(h1, jax.hessian(energy_convex)(q, X, beta)),
        "h2": relative_error(h2, jax.hessian(_neg_energy_concave)(q, X, beta), h2_scale),
        "eig1": min_eig(h1),
        "eig2": min_eig(h2),
        "rise": jnp.max(jnp.where(jnp.isfinite(rises), rises, -jnp.inf)),
        "attn_ours": relative_error(cross_attention(Q, X, X), hop, x_scale),
        "attn_jax": relative_error(jax_attention(Q, X), hop, x_scale),
    }


_checks_batch = jax.jit(jax.vmap(_per_problem, in_axes=(0, 0, 0, 0, None)), static_argnums=4)


def run_checks(
    trials: int = 64,
    seed: int = 0,
    beta_min: float = 1e-2,
    beta_max: float = 1e3,
    tol: float = 1e-10,
    cccp_steps: int = 50,
    shapes=SHAPES,
) -> list[Check]:
    """Check ``trials`` random problems of every shape in ``shapes``; one :class:`Check` per property.

    Memories and queries are standard normal; 4 attention queries per problem.
    """
    rng = np.random.default_rng(seed)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    eps = float(jnp.finfo(dtype).eps)
    worst: dict[str, float] = {}
    for n, d in shapes:
        X = jnp.asarray(rng.standard_normal((trials, n, d)), dtype)
        q = jnp.asarray(rng.standard_normal((trials, d)), dtype)
        Q = jnp.asarray(rng.standard_normal((trials, 4, d)), dtype)
        beta = jnp.asarray(np.exp(rng.uniform(np.log(beta_min), np.log(beta_max), trials)), dtype)
        figures = _checks_batch(q, X, beta, Q, cccp_steps)
        for key, values in figures.items():
            reduce = min if key.startswith("eig") else max
            value = float(jnp.min(values) if key.startswith("eig") else jnp.max(values))
            worst[key] = reduce(worst.get(key, value), value)

    psd_bound = -100 * eps
    # jax.nn.dot_product_attention always takes its softmax in float32, whatever the input dtype.
    f32_bound = 1e-5
    return [
        Check("grad E1 = q  vs jax.grad", worst["g1"], tol, note="max rel. error"),
        Check("grad(-E2) = X^T softmax(bXq)  vs jax.grad", worst["g2"], tol, note="max rel. error"),
        Check("hess E1 = I  vs jax.hessian", worst["h1"], tol, note="max rel. error"),
        Check(
            "hess(-E2) = b X^T(diag p - pp^T)X  vs jax.hessian",
            worst["h2"],
            tol,
            note="max rel. error, to |b X^T diag(p) X|",
        ),
        Check("hess E1 is PSD", worst["eig1"], psd_bound, at_least=True, note="min eigenvalue / max |entry|"),
        Check("hess(-E2) is PSD", worst["eig2"], psd_bound, at_least=True, note="min eigenvalue / max |entry|"),
        Check("CCCP never raises E", worst["rise"], 100 * eps, note="max rise / (1 + M^2 + |q0|^2 + logN/b)"),
        Check("CCCP step == cross_attention(Q, X, X)", worst["attn_ours"], tol, note="max rel. error, to max |X|"),
        Check(
            "CCCP step == jax.nn.dot_product_attention",
            worst["attn_jax"],
            f32_bound,
            note="max rel. error, to max |X| (float32 softmax)",
        ),
    ]
