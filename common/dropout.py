"""Dropout whose mask is a hash of each element's position and the call's key.

``nnx.Dropout`` draws its mask with ``jax.random.bernoulli``: Threefry, which XLA:CPU lowers to a
rolled loop that no fusion can enter, so each mask is a pass of its own over a (B,S,H) array. Here
the mask is an elementwise function that XLA fuses into the select that applies it:

    h_i = mix(mix(i * 0x9E3779B1 + k0) xor k1),    keep_i = (h_i >= round(rate * 2^32))
    y_i = keep_i * x_i / (1 - rate)

with i the element's flat index, (k0, k1) two 32-bit words of the call's key (a fresh key per call,
drawn from ``rngs`` as ``nnx.Dropout`` draws it) and mix Chris Wellons' ``lowbias32`` integer hash
(a bijection of uint32 with low avalanche bias). Same interface as ``nnx.Dropout`` (``rate``,
``deterministic``, toggled by ``Module.train()`` / ``eval()``). Part of the ``xla_cpu``
implementations of both parts (``cnn.xla_cpu``, ``p2g.xla_cpu``); the reference models use
``nnx.Dropout``. A mask depends on the element's index in the whole array, so it does not depend
on how a batch is split over devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def lowbias32(x):
    """Wellons' lowbias32 hash, elementwise on uint32: x ^= x >> 16; x *= 0x7feb352d;
    x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(key, shape, rate: float):
    """Boolean mask of ``shape``, each element True with probability 1 - ``rate``, a function of
    the element's flat index and ``key`` only (the module docstring's equation)."""
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = lowbias32(lowbias32(index * jnp.uint32(0x9E3779B1) + words[0]) ^ words[-1])
    return h >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


class HashedDropout(nnx.Module):
    """``nnx.Dropout(rate)`` with the mask of :func:`keep_mask`."""

    def __init__(self, rate: float, *, rng_collection: str = "dropout", deterministic: bool = False):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"dropout rate {rate} is not in [0, 1]")
        self.rate, self.rng_collection, self.deterministic = rate, rng_collection, deterministic

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs: nnx.Rngs | None = None):
        """``inputs`` with each element kept with probability 1 - rate and scaled by 1/(1 - rate);
        unchanged when deterministic or rate 0."""
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if rngs is None:
            raise ValueError("HashedDropout in training mode needs rngs (an nnx.Rngs with a 'dropout' stream)")
        key = rngs[self.rng_collection]()
        mask = keep_mask(key, inputs.shape, self.rate)
        return jnp.where(mask, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))
