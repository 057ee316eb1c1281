"""2x2 max-pooling, stride 2, with its gradient routed to one winner per window.

    y[b, i, j, c] = max over (p, q) in {0, 1}^2 of x[b, 2i + p, 2j + q, c]
    dL/dx[b, 2i + p, 2j + q, c] = dL/dy[b, i, j, c] if (p, q) is the window's winner, else 0

The winner is the first maximum in row-major order where several tie (as PyTorch's
``max_pool2d``), and its position is kept from the forward pass as an int8 code
``2 p + q``. The helpers (:func:`corners`, :func:`winners`, :func:`pick`, :func:`route`) are
shared with :mod:`cnn.xla_cpu.norm_pool`, which pools the BN variant's activations inside a fused
BatchNorm -> ReLU -> pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Corners = tuple[jax.Array, jax.Array, jax.Array, jax.Array]

# Position code of each pixel of a window, row-major: [[0, 1], [2, 3]], broadcast against the
# (B, H/2, 2, W/2, 2, C) view of an image.
_WINDOW_CODES = np.arange(4, dtype=np.int8).reshape(1, 1, 2, 1, 2, 1)


def corners(x: jax.Array) -> Corners:
    """``(B, H, W, C)``, H and W even -> the four ``(B, H/2, W/2, C)`` pixels of each 2x2 window:
    top-left, top-right, bottom-left, bottom-right."""
    B, H, W, C = x.shape
    w = x.reshape(B, H // 2, 2, W // 2, 2, C)
    return w[:, :, 0, :, 0], w[:, :, 0, :, 1], w[:, :, 1, :, 0], w[:, :, 1, :, 1]


def winners(windows: Corners) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each window's maximum and where it lies: ``(max, below, right)``, all ``(B, H/2, W/2, C)``;
    ``below`` / ``right`` (bool) say whether the first maximum is in the bottom row / right
    column. Ties go to the top row, then to the left column."""
    a, b, c, d = windows
    top, bottom = jnp.maximum(a, b), jnp.maximum(c, d)
    below = bottom > top
    right = jnp.where(below, d > c, b > a)
    return jnp.maximum(top, bottom), below, right


def pick(windows: Corners, below: jax.Array, right: jax.Array) -> jax.Array:
    """The pixel of each window at the position :func:`winners` found (of another array's windows)."""
    a, b, c, d = windows
    return jnp.where(below, jnp.where(right, d, c), jnp.where(right, b, a))


def position_code(below: jax.Array, right: jax.Array) -> jax.Array:
    """int8 code ``2 p + q`` of the winner's row p and column q inside its window."""
    return 2 * below.astype(jnp.int8) + right.astype(jnp.int8)


def route(g: jax.Array, code: jax.Array) -> jax.Array:
    """``(B, h, w, C)`` values and winner codes -> ``(B, 2h, 2w, C)``: each value at its window's
    winner, zeros elsewhere."""
    B, h, w, C = g.shape
    routed = jnp.where(code[:, :, None, :, None, :] == _WINDOW_CODES, g[:, :, None, :, None, :], 0)
    return routed.reshape(B, 2 * h, 2 * w, C)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2: ``(B, H, W, C) -> (B, H/2, W/2, C)``, H and W even; the gradient
    goes whole to one winner of each window (module docstring).

    Why not ``lax.reduce_window`` (``nnx.max_pool``, the reference model's): XLA lowers its
    gradient to select-and-scatter, slow on XLA:CPU. Nor ``jnp.max`` over the windows: its
    gradient re-evaluates ``x == max(x)`` in the backward pass, which inside a fused XLA:CPU
    training step routed gradients wrongly (docs/performance.md).
"""
    return _max_pool_fwd(x)[0]


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y, below, right = winners(corners(x))
    return y, position_code(below, right)


def _max_pool_bwd(code: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (route(g, code),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
