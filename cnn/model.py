"""The homework's CNNs in Flax NNX (Question 2). Images are NHWC: ``(B, 48, 48, 3)``.

Conv block: 3x3 conv (stride 1, pad 1) -> [BatchNorm] -> ReLU -> 2x2 max-pool (stride 2) -> dropout 0.1.
Three blocks, 32 / 64 / 128 channels: 48 -> 24 -> 12 -> 6 pixels a side.

Baseline head (``batch_norm=False``): flatten (6*6*128 = 4608) -> 1024 -> ReLU -> dropout 0.1
-> 512 -> ReLU -> 6 -> log-softmax. 5,340,742 trainable parameters.
BN variant (``batch_norm=True``): global average pooling (128) -> 1024 -> ReLU -> BatchNorm
-> dropout 0.1 -> 512 -> ReLU -> 6 -> log-softmax. 755,718 trainable parameters.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnn.dense import Linear
from p2g.dropout import HashedDropout

NUM_CLASSES = 6
IMAGE_SHAPE = (48, 48, 3)
CHANNELS = (32, 64, 128)
DROPOUT = 0.1


def _windows(x: jax.Array) -> jax.Array:
    """``(B, H, W, C) -> (B, H/2, 2, W/2, 2, C)``: axes 2 and 4 index a pixel inside its 2x2 window."""
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C)


# Position code of each pixel of a window, row-major: [[0, 1], [2, 3]], broadcast against _windows.
_WINDOW_CODES = np.arange(4, dtype=np.int8).reshape(1, 1, 2, 1, 2, 1)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2: ``(B, H, W, C) -> (B, H/2, W/2, C)``, H and W even.

    y[b, i, j, c] = max over (p, q) in {0, 1}^2 of x[b, 2i + p, 2j + q, c]. The gradient goes
    whole to one winner of each window, the first in row-major order where several tie (as
    PyTorch's ``max_pool2d`` does): dL/dx[b, 2i + p, 2j + q, c] = dL/dy[b, i, j, c] if (p, q) is
    the winner, else 0. The winner's position is computed once, in the forward pass, and kept
    as an int8 code.

    Why not ``lax.reduce_window`` or plain ``jnp.max``: XLA lowers the first's gradient to
    select-and-scatter, which on XLA:CPU made the backward pass of the three pools cost more
    than the convolutions (docs/performance.md); the second's gradient routes through
    ``x == max(x)``, re-evaluated in the backward pass, and inside the jitted BN training step
    that comparison went wrong: the gradients of the first two blocks differed from the
    op-by-op ones by 20% even in float64, and changed by half under a 1e-7 change of the
    parameters (docs/performance.md, item 9).
    """
    return _max_pool_fwd(x)[0]


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = _windows(x)
    a, b, c, d = w[:, :, 0, :, 0], w[:, :, 0, :, 1], w[:, :, 1, :, 0], w[:, :, 1, :, 1]
    top, bottom = jnp.maximum(a, b), jnp.maximum(c, d)
    below = bottom > top  # ties go to the top row, then to the left column
    right = jnp.where(below, d > c, b > a)
    code = 2 * below.astype(jnp.int8) + right.astype(jnp.int8)
    return jnp.maximum(top, bottom), code


def _max_pool_bwd(code: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    B, h, w, C = g.shape
    routed = jnp.where(code[:, :, None, :, None, :] == _WINDOW_CODES, g[:, :, None, :, None, :], 0)
    return (routed.reshape(B, 2 * h, 2 * w, C),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Identity(nnx.Module):
    """The switched-off BatchNorm: returns its input."""

    def __call__(self, x):
        return x


class ConvBlock(nnx.Module):
    """conv 3x3 -> [BatchNorm] -> ReLU -> max-pool 2x2 -> dropout: ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)``."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), strides=1, padding=1, rngs=rngs)
        self.norm = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs) if batch_norm else Identity()
        self.dropout = HashedDropout(DROPOUT)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = max_pool_2x2(nnx.relu(self.norm(self.conv(x))))
        return self.dropout(x, rngs=rngs)


class CNN(nnx.Module):
    """``(B, 48, 48, 3)`` float images -> ``(B, 6)`` log-probabilities.

    ``batch_norm`` switches between the baseline and the BN + global-average-pooling variant.
    Train/eval mode (dropout, BatchNorm statistics) follows ``model.train()`` / ``model.eval()``;
    in train mode dropout draws from ``rngs`` (its ``dropout`` stream), passed per call so that
    the model's state holds only arrays (parameters and BatchNorm statistics). Dropout is
    :class:`p2g.dropout.HashedDropout` (each mask a hash of the element's index and a fresh key),
    not ``nnx.Dropout``, whose Threefry masks XLA:CPU computes in loops of their own: 4-12% of a
    training step here (docs/performance.md, item 16).
    BatchNorm momentum 0.9 matches PyTorch's default running-average update (0.1 of the new batch).
    """

    def __init__(self, batch_norm: bool, rngs: nnx.Rngs):
        self.batch_norm = batch_norm
        ins = (IMAGE_SHAPE[-1],) + CHANNELS[:-1]
        self.blocks = nnx.List([ConvBlock(i, o, batch_norm, rngs) for i, o in zip(ins, CHANNELS)])
        side = IMAGE_SHAPE[0] // 2 ** len(CHANNELS)
        features = CHANNELS[-1] if batch_norm else side * side * CHANNELS[-1]
        self.fc1 = Linear(features, 1024, rngs=rngs)
        self.norm = nnx.BatchNorm(1024, momentum=0.9, rngs=rngs) if batch_norm else Identity()
        self.dropout = HashedDropout(DROPOUT)
        self.fc2 = Linear(1024, 512, rngs=rngs)
        self.fc3 = Linear(512, NUM_CLASSES, rngs=rngs)

    def __call__(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        chex.assert_rank(images, 4)
        x = images
        for block in self.blocks:
            x = block(x, rngs)
        x = jnp.mean(x, axis=(1, 2)) if self.batch_norm else x.reshape(x.shape[0], -1)
        x = self.dropout(self.norm(nnx.relu(self.fc1(x))), rngs=rngs)  # BN right before dropout
        x = nnx.relu(self.fc2(x))
        return jax.nn.log_softmax(self.fc3(x))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves; BatchNorm running stats excluded)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
