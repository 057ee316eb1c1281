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
from flax import nnx

from cnn.dense import Linear
from cnn.norm_pool import batch_norm_relu_pool
from cnn.pool import max_pool_2x2
from p2g.dropout import HashedDropout

NUM_CLASSES = 6
IMAGE_SHAPE = (48, 48, 3)
CHANNELS = (32, 64, 128)
DROPOUT = 0.1


class Identity(nnx.Module):
    """The switched-off BatchNorm: returns its input."""

    def __call__(self, x):
        return x


class ConvBlock(nnx.Module):
    """conv 3x3 -> [BatchNorm] -> ReLU -> max-pool 2x2 -> dropout: ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)``.

    With BatchNorm in training mode, the convolution's output goes through
    :func:`cnn.norm_pool.batch_norm_relu_pool` (the same function, its gradient written out:
    fewer passes over the block's largest tensors), and the running statistics are updated here
    as ``nnx.BatchNorm`` would: ``r <- momentum r + (1 - momentum) batch``.
    """

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), strides=1, padding=1, rngs=rngs)
        self.norm = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs) if batch_norm else Identity()
        self.dropout = HashedDropout(DROPOUT)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        norm = self.norm
        if isinstance(norm, nnx.BatchNorm) and not norm.use_running_average:
            y = jax.lax.conv_general_dilated(
                x, self.conv.kernel[...], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x, mean, var = batch_norm_relu_pool(y, self.conv.bias[...], norm.scale[...], norm.bias[...], norm.epsilon)
            norm.mean[...] = jax.lax.stop_gradient(norm.momentum * norm.mean[...] + (1 - norm.momentum) * mean)
            norm.var[...] = jax.lax.stop_gradient(norm.momentum * norm.var[...] + (1 - norm.momentum) * var)
        else:
            x = max_pool_2x2(nnx.relu(norm(self.conv(x))))
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
