"""The homework's CNNs in Flax NNX (Question 2). Images are NHWC: ``(B, 48, 48, 3)``.

Conv block: 3x3 conv (stride 1, pad 1) -> [BatchNorm] -> ReLU -> 2x2 max-pool (stride 2) -> dropout 0.1.
Three blocks, 32 / 64 / 128 channels: 48 -> 24 -> 12 -> 6 pixels a side.

Baseline head (``batch_norm=False``): flatten (6*6*128 = 4608) -> 1024 -> ReLU -> dropout 0.1
-> 512 -> ReLU -> 6 -> log-softmax. 5,340,742 trainable parameters.
BN variant (``batch_norm=True``): global average pooling (128) -> 1024 -> ReLU -> BatchNorm
-> dropout 0.1 -> 512 -> ReLU -> 6 -> log-softmax. 755,718 trainable parameters.
With ``pool="hopfield"`` the BN variant pools the last block's 6x6 grid with a
:class:`hopfield.layers.HopfieldPooling` instead (one learned query retrieving from the 36
feature vectors: Z = softmax(beta Q K^T) V); 822,150 trainable parameters.

``impl="reference"`` (the default) builds the model from Flax's own layers, its gradient by
autodiff. ``impl="xla_cpu"`` swaps in the kernels of :mod:`cnn.xla_cpu` (written-out gradients
and hashed dropout masks, faster on XLA:CPU) through the seams below: the block class, the dropout
class and the dense layers' ``dot_general``. Both build the same parameters (paths, shapes,
initial values), so a checkpoint of one loads into the other.

``dtype``: what the layers compute in (None: their float32 parameters'; ``jnp.bfloat16``: mixed
precision, :mod:`common.precision`): convolutions, BatchNorm's output and dense layers in that
dtype from float32 parameters, BatchNorm statistics and the log-softmax in float32.
The Hopfield pooling has no bfloat16 path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from common.precision import at_least_float32

NUM_CLASSES = 6
IMAGE_SHAPE = (48, 48, 3)
CHANNELS = (32, 64, 128)
DROPOUT = 0.1
IMPLS = ("reference", "xla_cpu")
POOLS = ("average", "hopfield")


class ConvBlock(nnx.Module):
    """conv 3x3 -> [BatchNorm] -> ReLU -> max-pool 2x2 -> dropout: ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)``.

    BatchNorm momentum 0.9 matches PyTorch's running-average update (0.1 of the new batch).
    ``dtype``: the computation's (None: the parameters'); BatchNorm's statistics are float32 at least.
    """

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool, rngs: nnx.Rngs, dtype=None):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), strides=1, padding=1, dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(out_channels, momentum=0.9, dtype=dtype, rngs=rngs) if batch_norm else None
        self.dropout = nnx.Dropout(DROPOUT)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        x = nnx.max_pool(nnx.relu(x), window_shape=(2, 2), strides=(2, 2))
        return self.dropout(x, rngs=rngs)


@dataclass(frozen=True)
class Layers:
    """What an implementation builds the CNN from."""

    conv_block: type[nnx.Module]  # called as conv_block(in, out, batch_norm, rngs=..., dtype=...)
    dropout: type[nnx.Module]  # called as dropout(rate), then dropout(x, rngs=...)
    dot_general: Callable[..., Any]  # the dense layers' product (nnx.Linear's dot_general=)


REFERENCE = Layers(conv_block=ConvBlock, dropout=nnx.Dropout, dot_general=jax.lax.dot_general)


def layers(impl: str) -> Layers:
    """The layer set of ``impl`` ("reference" or "xla_cpu"); raises ``ValueError`` for any other."""
    if impl == "reference":
        return REFERENCE
    if impl == "xla_cpu":
        from cnn.xla_cpu import LAYERS

        return LAYERS
    raise ValueError(f"unknown CNN implementation {impl!r}; expected one of {IMPLS}")


def hopfield_pooling(features: int, rngs: nnx.Rngs) -> nnx.Module:
    """One learned query retrieving from the last block's ``features``-wide feature vectors
    (:mod:`hopfield.layers`)."""
    from hopfield.layers import HopfieldPooling

    return HopfieldPooling(features, quantity=1, rngs=rngs)


class CNN(nnx.Module):
    """``(B, 48, 48, 3)`` float images -> ``(B, 6)`` log-probabilities.

    ``batch_norm`` switches between the baseline and the BN + global-average-pooling variant;
    ``impl`` picks the layer set and ``pool`` the BN variant's pooling (module docstring);
    ``width`` multiplies the blocks' channels (1: the homework's 32 / 64 / 128).
    Train/eval mode (dropout, BatchNorm statistics) follows ``model.train()`` / ``model.eval()``;
    in train mode dropout draws from ``rngs`` (its ``dropout`` stream), passed per call so that
    the model's state holds only arrays (parameters and BatchNorm statistics). ``dtype``: the
    layers' computation dtype (module docstring). Raises ``ValueError`` for an unknown ``impl`` or
    ``pool``, for ``pool="hopfield"`` without BatchNorm, for ``pool="hopfield"`` with a ``dtype`` and
    for ``width`` < 1.
    """

    def __init__(self, batch_norm: bool, rngs: nnx.Rngs, impl: str = "reference", pool: str = "average",
                 dtype=None, width: int = 1):
        parts = layers(impl)
        if pool not in POOLS:
            raise ValueError(f"unknown pooling {pool!r}; expected one of {POOLS}")
        if pool == "hopfield" and not batch_norm:
            raise ValueError("pool='hopfield' replaces the BN variant's global average pooling: it needs batch_norm=True")
        if pool == "hopfield" and dtype is not None:
            raise ValueError("pool='hopfield' computes in its parameters' dtype: it takes no dtype (no bfloat16 path)")
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        self.batch_norm, self.impl = batch_norm, impl
        channels = tuple(width * c for c in CHANNELS)
        ins = (IMAGE_SHAPE[-1],) + channels[:-1]
        self.blocks = nnx.List([parts.conv_block(i, o, batch_norm, rngs=rngs, dtype=dtype) for i, o in zip(ins, channels)])
        side = IMAGE_SHAPE[0] // 2 ** len(channels)
        features = channels[-1] if batch_norm else side * side * channels[-1]
        self.fc1 = nnx.Linear(features, 1024, dot_general=parts.dot_general, dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(1024, momentum=0.9, dtype=dtype, rngs=rngs) if batch_norm else None
        self.dropout = parts.dropout(DROPOUT)
        self.fc2 = nnx.Linear(1024, 512, dot_general=parts.dot_general, dtype=dtype, rngs=rngs)
        self.fc3 = nnx.Linear(512, NUM_CLASSES, dot_general=parts.dot_general, dtype=dtype, rngs=rngs)
        self.pool = hopfield_pooling(channels[-1], rngs) if pool == "hopfield" else None  # made last: the other layers
        # then start as in the average-pooling model

    def __call__(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        chex.assert_rank(images, 4)
        x = images
        for block in self.blocks:
            x = block(x, rngs)
        if not self.batch_norm:
            x = x.reshape(x.shape[0], -1)  # flatten
        elif self.pool is None:
            x = jnp.mean(x, axis=(1, 2))  # global average pooling
        else:
            x = self.pool(x.reshape(x.shape[0], -1, x.shape[-1]))[:, 0]  # Hopfield pooling of the 6x6 grid
        x = nnx.relu(self.fc1(x))
        if self.norm is not None:
            x = self.norm(x)  # BN right before dropout
        x = self.dropout(x, rngs=rngs)
        x = nnx.relu(self.fc2(x))
        return jax.nn.log_softmax(at_least_float32(self.fc3(x)))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves; BatchNorm running stats excluded)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
