"""The BN variant's conv-block tail in training mode, BatchNorm -> ReLU -> 2x2 max-pool, as one
function with its gradient written out.

Forward, per channel c, over the n = B H W positions of the convolution's output y (its bias b
not yet added; BatchNorm cancels it, and it enters only the batch mean reported):

    m   = mean(y),   v = mean(y^2) - m^2   (clipped at 0; flax's ``use_fast_variance``)
    xh  = (y - m) rstd,   rstd = 1 / sqrt(v + eps),   z = gamma xh + beta
    out = max-pool(relu(z))              (the winner of each window as in :mod:`cnn.xla_cpu.pool`)
    returns out (B, H/2, W/2, C) and the statistics of y + b: mean m + b, variance v

Backward, with g = dL/dout and gz = g where out > 0, else 0 (pooled resolution); xh_w the
normalised value at each window's winner; route() puts a pooled value at its window's winner:

    dbeta  = sum(gz),   dgamma = sum(gz xh_w),   gx = gamma gz   (dL/dxh at the winners)
    dy     = rstd (route(gx) - sum(gx)/n - xh sum(gx xh_w)/n) + (dL/dmean + 2 dL/dvar (y - m)) / n
    db     = dL/dmean

(the last terms carry the gradient of the returned statistics, zero when they only feed the
running averages). Written this way the block's full-resolution tensors are read in three
passes (two for the statistics, one for the pool) and the gradient written in one, straight into
the layout the kernel gradient reads, where autodiff of the composed layers makes many passes
around reductions XLA:CPU cannot fuse (measurements: docs/performance.md).

A bfloat16 y (mixed precision) is widened to float32 for all of this, as ``nnx.BatchNorm``
computes its statistics and normalisation; out and dy are in y's dtype.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp

from cnn.xla_cpu.pool import corners, pick, position_code, route, winners
from common.precision import at_least_float32

_AXES = (0, 1, 2)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_relu_pool(y: jax.Array, bias: jax.Array, scale: jax.Array, beta: jax.Array, eps: float):
    """``(B, H, W, C), (C,) x 3, eps -> (out (B, H/2, W/2, C), mean (C,), var (C,))``, as in the
    module docstring; ``mean`` and ``var`` are the batch statistics of ``y + bias`` (for the
    running averages), float32 at least; ``out`` in ``y``'s dtype."""
    return _forward(y, bias, scale, beta, eps)[0]


def _forward(y, bias, scale, beta, eps):
    chex.assert_rank([y, bias, scale, beta], [4, 1, 1, 1])  # here, so that it runs under autodiff too
    chex.assert_equal_shape([bias, scale, beta, y[0, 0, 0]])
    wide = at_least_float32(y)
    m = jnp.mean(wide, _AXES)
    var = jnp.maximum(jnp.mean(jnp.square(wide), _AXES) - jnp.square(m), 0.0)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (wide - m) * rstd
    zmax, below, right = winners(corners(xhat * scale + beta))
    xhat_winner = pick(corners(xhat), below, right)
    out = jnp.maximum(zmax, 0.0).astype(y.dtype)
    residuals = (y, m, rstd, scale, position_code(below, right), xhat_winner, out)
    return (out, m + bias, var), residuals


def _backward(eps, residuals, cotangents):
    y, m, rstd, scale, code, xhat_winner, out = residuals
    g, g_mean, g_var = cotangents
    n = y.shape[0] * y.shape[1] * y.shape[2]
    gz = jnp.where(out > 0, at_least_float32(g), 0.0)
    d_beta = jnp.sum(gz, _AXES)
    d_scale = jnp.sum(gz * xhat_winner, _AXES)
    gx = gz * scale
    mean_gx = jnp.sum(gx, _AXES) / n
    mean_gx_xhat = jnp.sum(gx * xhat_winner, _AXES) / n
    centred = at_least_float32(y) - m
    dy = rstd * (route(gx, code) - mean_gx - centred * (rstd * mean_gx_xhat)) + (g_mean + 2 * g_var * centred) / n
    return dy.astype(y.dtype), g_mean, d_scale, d_beta


batch_norm_relu_pool.defvjp(_forward, _backward)
