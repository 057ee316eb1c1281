"""The dense layers' product ``y = x W`` with its gradient written out, as ``nnx.Linear``'s
``dot_general``.

    y  = x W                         x: (B, K), W: (K, N) -> y: (B, N)
    dx = g W^T,   dW = x^T g                                g = dL/dy: (B, N)

Why: autodiff gives ``dx = g W^T``, a dot whose right operand is read along its rows, and XLA:CPU
hands it to YNNPACK, which transposes the whole of ``W`` (the baseline's 4608 x 1024 ``fc1``
kernel) on every step. Here ``dx`` is computed as ``(W g^T)^T``, a product that reads ``W`` as it
lies, and ``dW`` from ``x^T`` copied once (a small (K, B) array); each product sits behind
``lax.optimization_barrier`` so that XLA's simplifier does not fold the transposes back into the
dot. The bias stays ``nnx.Linear``'s, its gradient autodiff's.
"""

from __future__ import annotations

import jax

# x (B, K) . W (K, N): contract x's last axis with W's first, no batch axes (what nnx.Linear asks for).
MATMUL = (((1,), (0,)), ((), ()))


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``(B, K), (K, N) -> (B, N)``: x W, with the gradient of the module docstring."""
    return x @ kernel


def _matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    contract_n = (((1,), (1,)), ((), ()))
    dx = jax.lax.optimization_barrier(jax.lax.dot_general(kernel, g, contract_n)).T  # (W g^T)^T = g W^T
    dkernel = jax.lax.optimization_barrier(x.T) @ g
    return dx, dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """``jax.lax.dot_general``'s signature: :func:`matmul` for a (B, K) x (K, N) product at default
    precision, ``jax.lax.dot_general`` itself for anything else."""
    if (lhs.ndim, rhs.ndim) == (2, 2) and dimension_numbers == MATMUL and precision is None \
            and preferred_element_type is None and kwargs.get("out_sharding") is None:
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
