"""The conv block of :mod:`cnn.model` computed with this package's kernels."""

from __future__ import annotations

import jax
from flax import nnx

from cnn import model
from cnn.xla_cpu.norm_pool import batch_norm_relu_pool
from cnn.xla_cpu.pool import max_pool_2x2
from common.dropout import HashedDropout


class ConvBlock(model.ConvBlock):
    """:class:`cnn.model.ConvBlock` (same parameters and statistics, same function) with
    :func:`cnn.xla_cpu.pool.max_pool_2x2`, hashed dropout and, for a BN block in training mode,
    :func:`cnn.xla_cpu.norm_pool.batch_norm_relu_pool`. That fused path owns the block's batch
    statistics: it updates the running averages as ``nnx.BatchNorm`` does,
    ``r <- momentum r + (1 - momentum) batch``."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, rngs: nnx.Rngs, dtype=None):
        super().__init__(in_channels, out_channels, batch_norm, rngs, dtype)
        self.dropout = HashedDropout(model.DROPOUT)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.norm is not None and not self.norm.use_running_average:
            x = self._normalise_relu_pool(x)
        else:
            x = self.conv(x)
            if self.norm is not None:
                x = self.norm(x)
            x = max_pool_2x2(nnx.relu(x))
        return self.dropout(x, rngs=rngs)

    def _normalise_relu_pool(self, x: jax.Array) -> jax.Array:
        """Training mode: conv (its bias left to BatchNorm, which cancels it) -> fused BatchNorm ->
        ReLU -> pool, and the running statistics' update; the conv in ``self.conv``'s dtype, as nnx.Conv."""
        norm, conv = self.norm, self.conv
        x, kernel = conv.promote_dtype((x, conv.kernel[...]), dtype=conv.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x, mean, var = batch_norm_relu_pool(y, conv.bias[...], norm.scale[...], norm.bias[...], norm.epsilon)
        norm.mean[...] = jax.lax.stop_gradient(norm.momentum * norm.mean[...] + (1 - norm.momentum) * mean)
        norm.var[...] = jax.lax.stop_gradient(norm.momentum * norm.var[...] + (1 - norm.momentum) * var)
        return x
