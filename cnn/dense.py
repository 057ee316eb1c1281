"""The CNN's dense layers, ``y = x W + b``, with their gradient written out.

    y  = x W + b                     x: (B, K), W: (K, N), b: (N,) -> y: (B, N)
    dx = g W^T,   dW = x^T g,   db = sum_b g[b]          g = dL/dy: (B, N)

Why not ``nnx.Linear`` as it is: autodiff gives ``dx = g W^T``, a dot whose right operand is
read along its rows, and XLA:CPU hands it to YNNPACK, which transposes the whole of ``W`` (the
baseline's 4608 x 1024 ``fc1`` kernel, 19 MB) on every step. Here ``dx`` is computed as
``(W g^T)^T``, a product that reads ``W`` as it lies, and ``dW`` from ``x^T`` copied once (a small
(K, B) array); each product sits behind ``lax.optimization_barrier`` so that XLA's simplifier
does not fold the transposes back into the dot. Alone, batch 8: ``dx`` 1.43 -> 0.59 ms, ``dW``
1.95 -> 0.97 ms; batch 64: ``dx`` 4.21 -> 3.13 ms (docs/performance.md, item 16).
"""

from __future__ import annotations

import chex
import jax
from flax import nnx


def _affine(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return x @ kernel + bias


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``(B, K), (K, N), (N,) -> (B, N)``: x W + b, with the gradient of the module docstring."""
    chex.assert_rank([x, kernel, bias], [2, 2, 1])
    return _affine(x, kernel, bias)


def _dense_fwd(x, kernel, bias):
    return _affine(x, kernel, bias), (x, kernel)


def _dense_bwd(residuals, g):
    x, kernel = residuals
    contract_n = (((1,), (1,)), ((), ()))
    dx = jax.lax.optimization_barrier(jax.lax.dot_general(kernel, g, contract_n)).T  # (W g^T)^T = g W^T
    dkernel = jax.lax.optimization_barrier(x.T) @ g
    return dx, dkernel, g.sum(axis=0)


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters, same initialisation) computed by :func:`dense`."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return dense(inputs, self.kernel[...], self.bias[...])
