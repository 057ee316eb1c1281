"""Which examples each training step sees and which dropout key it uses, shared by both trainers.

Both are functions of (seed, epoch, step) alone, so a run resumed from an epoch checkpoint, or
split over any number of devices or processes, repeats exactly what an uninterrupted one-device
run does.
"""

from __future__ import annotations

import jax
import numpy as np


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(ceil(n / B), B) example indices for ``epoch``: a permutation seeded by (seed, epoch), the
    last batch completed with the permutation's first examples (every example is seen at least once)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = -(-n // batch_size)
    return np.concatenate([perm, perm[: steps * batch_size - n]]).reshape(steps, batch_size)


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool: int = 16) -> np.ndarray:
    """:func:`epoch_batches` with examples of similar ``lengths`` (n,) in the same batch, to cut
    padding: the epoch's permutation is cut into pools of ``pool`` batches, each pool is sorted by
    length (stable) and cut into batches, and the batches are shuffled, seeded by (seed, epoch).
    Every batch still mixes examples from across the data set; ``pool=1`` is plain shuffling."""
    batches = epoch_batches(len(lengths), batch_size, seed, epoch)
    if pool <= 1:
        return batches
    flat = batches.reshape(-1)
    chunks = [flat[start:start + pool * batch_size] for start in range(0, len(flat), pool * batch_size)]
    flat = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in chunks])
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return flat.reshape(batches.shape)[order]


def epoch_key(seed: int, epoch: int) -> jax.Array:
    """The key of ``epoch``'s dropout masks; step s of training uses ``fold_in(epoch_key, s)``."""
    return jax.random.fold_in(jax.random.key(seed), epoch)


def step_key(epoch_key: jax.Array, step) -> jax.Array:
    """The dropout key of global step ``step`` (a traced scalar under jit) within its epoch's key."""
    return jax.random.fold_in(epoch_key, step)
