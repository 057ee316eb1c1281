"""Mixed precision: the ``--dtype`` names and the cast that keeps softmax and losses in float32.

``float32``: every layer computes in its parameters' dtype (the nnx layers' ``dtype=None``).
``bfloat16``: the layers compute in bfloat16 from float32 parameters (``dtype=jnp.bfloat16``,
``param_dtype`` float32: the Flax ImageNet example's ``half_precision``); gradients reach the
float32 parameters through the casts, so parameters, optimiser state and BatchNorm statistics
stay float32, and the models widen their logits (:func:`at_least_float32`) before softmax,
log-softmax and the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str):
    """The layers' ``dtype`` for the ``--dtype`` ``name``: None (the parameters' dtype) for
    "float32", ``jnp.bfloat16`` for "bfloat16"; raises ``ValueError`` for any other name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPES}")
    return None if name == "float32" else jnp.bfloat16


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in float32 where it is in a narrower float (bfloat16), unchanged otherwise (float32,
    float64): what softmax, log-softmax and losses read. Any shape."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
