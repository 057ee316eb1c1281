"""Training-time augmentation of uint8 image batches, as pure functions of (key, batch) for use
inside the jitted training step.

Each example draws its own transformation from the step's key, so the augmented batch is a
function of (seed, epoch, step) like the dropout masks (:mod:`common.batching`), whatever the
devices: JAX's random numbers of a global batch do not depend on how it is sharded.

- :func:`random_crop`: pad each side by ``pad`` pixels (edge values repeated) and cut a random
  window of the original size (a shift of up to ``pad`` pixels each way).
- :func:`random_flip`: mirror left-right with probability 1/2.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "flip", "flip-crop")
CROP_PAD = 4  # pixels of shift at most, a twelfth of a 48-pixel side


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """``(B, H, W, C) -> (B, H, W, C)``: each image mirrored left-right with probability 1/2."""
    chex.assert_rank(images, 4)
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def random_crop(key: jax.Array, images: jax.Array, pad: int = CROP_PAD) -> jax.Array:
    """``(B, H, W, C) -> (B, H, W, C)``: each image padded by ``pad`` pixels a side (edge mode)
    and cut back to H x W at an offset drawn uniformly from {0..2 pad}^2."""
    chex.assert_rank(images, 4)
    B, H, W, C = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (B, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (H, W, C))

    return jax.vmap(crop)(padded, offsets)


def augment(key: jax.Array, images: jax.Array, kind: str) -> jax.Array:
    """``images`` (B, H, W, C) transformed by ``kind`` (one of :data:`AUGMENTATIONS`; "none" returns
    them unchanged). Raises ``ValueError`` for another ``kind``."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
    if kind == "none":
        return images
    flip_key, crop_key = jax.random.split(key)
    images = random_flip(flip_key, images)
    return random_crop(crop_key, images) if kind == "flip-crop" else images
