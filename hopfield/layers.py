"""Hopfield layers in Flax NNX: ``Hopfield``, ``HopfieldPooling`` and ``HopfieldLayer``.

The counterpart of the PyTorch reference ``hopfield-layers`` (Ramsauer et al., 2020), built on the
pure functions of this package. Shapes: B batch, H heads, S state patterns (queries), N stored
patterns (keys), D / d feature sizes (``d`` per head), ``beta > 0`` the inverse temperature.

With the state patterns xi and stored patterns Y projected into the association space,
Q = xi W_Q, K = Y W_K, V = Y W_V (per head), a Hopfield layer iterates the CCCP update (3)

    Q <- softmax(beta Q K^T) K                                                       (4)

``update_steps - 1`` times (a query stops once an update moves it by less than ``update_tol``) and
then reads out the values

    Z = softmax(beta Q K^T) V,   output = concat_h(Z_h) W_O.                          (5)

With ``update_steps = 1`` this is multi-head attention with scale beta; with identity projections
and V = K it is ``update_steps`` CCCP steps of :func:`hopfield.cccp_step`. Every softmax
subtracts the max score before beta scales it (as :func:`hopfield.energy.softmax`), so large beta
and large inputs stay finite in float32; masked stored patterns get weight exactly 0.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hopfield.energy import check_beta, softmax

# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def masked_softmax(z: chex.Array, beta: chex.Numeric, mask: chex.Array | None = None) -> chex.Array:
    """p = softmax(beta z) over the last axis, restricted to the entries where ``mask`` is True.

    ``z``: ``(..., N)``; ``mask``: bool, broadcastable to ``z`` (True = keep) -> ``(..., N)``.
    Without a mask this is :func:`hopfield.energy.softmax`. With one, the max over the KEPT entries
    (held constant under autodiff) is subtracted before beta scales the scores, masked entries get
    weight exactly 0 and no gradient, and a row with every entry masked gets all-zero weights
    (not NaN): its read-out is the zero vector.
    """
    if mask is None:
        return softmax(z, beta)
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), z.shape)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(mask, z, -jnp.inf), axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))  # fully masked row: any finite shift
    # double where: the masked branch never sees z, so neither its value nor its gradient leaks
    shifted = jnp.where(mask, z - top, jnp.zeros_like(z))
    unnormalised = jnp.where(mask, jnp.exp(beta * shifted), jnp.zeros_like(z))
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)  # >= 1 in a row with a kept entry
    return unnormalised / jnp.where(total > 0, total, jnp.ones_like(total))


def _check_patterns(state: chex.Array, stored: chex.Array, mask: chex.Array | None) -> None:
    chex.assert_rank([state, stored], 4)
    chex.assert_equal(state.shape[:2], stored.shape[:2])  # (B, H)
    chex.assert_equal(state.shape[-1], stored.shape[-1])  # d
    if mask is not None:
        chex.assert_shape(mask, (stored.shape[0], stored.shape[2]))


def _mask4(mask: chex.Array | None) -> chex.Array | None:
    """(B, N) -> (B, 1, 1, N), broadcast over heads and queries."""
    return None if mask is None else jnp.asarray(mask, bool)[:, None, None, :]


def hopfield_weights(
    state: chex.Array, stored: chex.Array, beta: chex.Numeric, mask: chex.Array | None = None
) -> chex.Array:
    """The association matrix P = softmax(beta Q K^T) of every head, masked stored patterns at 0.

    ``state`` Q: ``(B, H, S, d)``, ``stored`` K: ``(B, H, N, d)``, ``mask``: ``(B, N)`` bool,
    True = keep -> ``(B, H, S, N)``. Raises ``ValueError`` for a concrete beta <= 0.
    """
    _check_patterns(state, stored, mask)
    check_beta(beta)
    scores = jnp.einsum("bhsd,bhnd->bhsn", state, stored)
    return masked_softmax(scores, beta, _mask4(mask))


def hopfield_iterate(
    state: chex.Array,
    stored: chex.Array,
    beta: chex.Numeric,
    mask: chex.Array | None = None,
    *,
    num_updates: int,
    tol: chex.Numeric = 0.0,
) -> tuple[chex.Array, chex.Array]:
    """Apply the CCCP update (4) Q <- softmax(beta Q K^T) K ``num_updates`` times, per query
    stopping once an update moves it by less than ``tol`` (that update is kept, as in
    :func:`hopfield.cccp_retrieve`).

    ``state``: ``(B, H, S, d)``, ``stored``: ``(B, H, N, d)``, ``mask``: ``(B, N)`` bool ->
    (the state ``(B, H, S, d)``, the updates applied to each query ``(B, H, S)`` int32).
    A fixed-length ``lax.scan`` with a per-query "done" mask, so it can be jit-ed, vmap-ed and
    reverse-differentiated (a converged query is frozen, not skipped: every step costs the same).
    ``num_updates`` is static; ``tol`` may be traced. Raises ``ValueError`` for
    ``num_updates < 0``, a concrete ``tol < 0`` or beta <= 0.
    """
    _check_patterns(state, stored, mask)
    check_beta(beta)
    if int(num_updates) != num_updates or num_updates < 0:
        raise ValueError(f"num_updates must be a non-negative integer, got {num_updates}")
    if not isinstance(tol, jax.core.Tracer) and not np.all(np.asarray(tol) >= 0):
        raise ValueError(f"tol must be >= 0, got {tol}")
    done = jnp.zeros(state.shape[:-1], bool)
    count = jnp.zeros(state.shape[:-1], jnp.int32)
    if num_updates == 0:
        return state, count

    def body(carry, _):
        xi, done, count = carry
        new = jnp.einsum("bhsn,bhnd->bhsd", hopfield_weights(xi, stored, beta, mask), stored)
        moved = jnp.linalg.norm(jax.lax.stop_gradient(new - xi), axis=-1)
        xi = jnp.where(done[..., None], xi, new)
        count = count + (~done).astype(jnp.int32)
        done = done | ~(moved >= tol)  # a NaN move stops the query too
        return (xi, done, count), None

    (state, _, count), _ = jax.lax.scan(body, (state, done, count), None, length=int(num_updates))
    return state, count


def hopfield_update(
    state: chex.Array,
    stored: chex.Array,
    values: chex.Array,
    beta: chex.Numeric,
    mask: chex.Array | None = None,
    *,
    update_steps: int = 1,
    update_tol: chex.Numeric = 0.0,
) -> tuple[chex.Array, chex.Array]:
    """The masked multi-head Hopfield retrieval of a layer: ``update_steps - 1`` state updates (4)
    by :func:`hopfield_iterate`, then the read-out (5) Z = softmax(beta Q K^T) V.

    ``state`` Q: ``(B, H, S, d)``, ``stored`` K: ``(B, H, N, d)``, ``values`` V:
    ``(B, H, N, d_v)``, ``mask``: ``(B, N)`` bool, True = keep -> (Z ``(B, H, S, d_v)``, the
    read-out weights ``(B, H, S, N)``). With V = K the read-out is itself an update, so the result
    is ``update_steps`` CCCP steps (:func:`hopfield.cccp_step` per query and head). A query whose
    stored patterns are all masked reads out zeros. Raises ``ValueError`` for
    ``update_steps < 1``, ``update_tol < 0`` or beta <= 0.
    """
    chex.assert_rank(values, 4)
    chex.assert_equal(values.shape[:3], stored.shape[:3])  # (B, H, N)
    if int(update_steps) != update_steps or update_steps < 1:
        raise ValueError(f"update_steps must be an integer >= 1, got {update_steps}")
    state, _ = hopfield_iterate(state, stored, beta, mask, num_updates=update_steps - 1, tol=update_tol)
    weights = hopfield_weights(state, stored, beta, mask)
    return jnp.einsum("bhsn,bhnd->bhsd", weights, values), weights


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Hopfield(nnx.Module):
    """A Hopfield association layer: state patterns retrieve from stored patterns, equations (4)-(5).

    ``layer(state_pattern (B, S, D), stored_pattern (B, N, D_k), pattern_projection (B, N, D_v) =
    stored_pattern, mask (B, N) bool True = keep)`` -> ``(B, S, output_size)``, and with
    ``return_weights=True`` also the read-out weights ``(B, num_heads, S, N)`` (before dropout).

    Options, each beside its equation:

    * ``normalize``: LayerNorm (eps 1e-5, learned affine) on xi, Y and the pattern projection
      before anything else, as in Ramsauer et al.
    * ``num_heads``, ``head_size`` (d, default ``input_size // num_heads``): Q = xi W_Q,
      K = Y W_K, V = Y_v W_V (``w_q``, ``w_k``, ``w_v``), each an ``nnx.Linear`` without bias
      into ``num_heads * head_size``, split into heads.
    * ``scaling`` beta (default 1/sqrt(head_size)): P = softmax(beta Q K^T).
    * ``update_steps``, ``update_tol``: ``update_steps - 1`` updates Q <- P K in the association
      space, a query stopping once it moves by less than ``update_tol``; then Z = P V.
    * ``output_size`` (default ``input_size``): output = concat_h(Z_h) W_O (``w_o``, no bias).
    * ``static=True``: no learned projections: Q = xi, K = Y, V = pattern projection, one head,
      output = Z (the retrieved pattern); with ``normalize=False`` one step is
      :func:`hopfield.cccp_step_batch`.
    * ``dropout``: ``nnx.Dropout`` on P before the read-out, in training mode (the default;
      ``layer.eval()`` turns it off), drawing from ``rngs=nnx.Rngs(dropout=key)`` passed per call.
    * ``stored_size``, ``value_size`` (default ``input_size``): D_k and D_v.

    Raises ``ValueError`` for inconsistent options (listed in the messages).
    """

    def __init__(
        self,
        input_size: int,
        *,
        num_heads: int = 1,
        head_size: int | None = None,
        output_size: int | None = None,
        stored_size: int | None = None,
        value_size: int | None = None,
        scaling: float | None = None,
        update_steps: int = 1,
        update_tol: float = 0.0,
        normalize: bool = True,
        static: bool = False,
        dropout: float = 0.0,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        input_size = _positive_int("input_size", input_size)
        num_heads = _positive_int("num_heads", num_heads)
        stored_size = input_size if stored_size is None else _positive_int("stored_size", stored_size)
        value_size = input_size if value_size is None else _positive_int("value_size", value_size)
        update_steps = _positive_int("update_steps", update_steps)
        if not (np.isfinite(update_tol) and update_tol >= 0):
            raise ValueError(f"update_tol must be finite and >= 0, got {update_tol!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if static:
            if num_heads != 1:
                raise ValueError(f"static=True has no projections to split into heads: num_heads must be 1, got {num_heads}")
            if head_size is not None and head_size != input_size:
                raise ValueError(f"static=True works in the input space: head_size must be None or {input_size}, got {head_size}")
            if stored_size != input_size:
                raise ValueError(f"static=True compares state and stored patterns directly: stored_size must equal input_size ({input_size}), got {stored_size}")
            if output_size is not None and output_size != value_size:
                raise ValueError(f"static=True outputs the retrieved pattern: output_size must be None or value_size ({value_size}), got {output_size}")
            head_size, output_size = input_size, value_size
        else:
            if head_size is None:
                if input_size % num_heads:
                    raise ValueError(f"input_size ({input_size}) must be divisible by num_heads ({num_heads}) when head_size is None")
                head_size = input_size // num_heads
            head_size = _positive_int("head_size", head_size)
            output_size = input_size if output_size is None else _positive_int("output_size", output_size)
        if scaling is None:
            scaling = 1.0 / math.sqrt(head_size)
        try:
            beta = float(scaling)
        except (TypeError, ValueError):
            beta = float("nan")
        if isinstance(scaling, bool) or not (np.isfinite(beta) and beta > 0):
            raise ValueError(f"scaling (beta) must be a positive finite number, got {scaling!r}")

        self.input_size, self.stored_size, self.value_size = input_size, stored_size, value_size
        self.num_heads, self.head_size, self.output_size = num_heads, head_size, output_size
        self.scaling, self.update_steps, self.update_tol = beta, update_steps, float(update_tol)
        self.normalize, self.static = normalize, static

        def norm(size):
            return nnx.LayerNorm(size, epsilon=1e-5, param_dtype=param_dtype, rngs=rngs) if normalize else None

        def linear(n_in, n_out):
            return None if static else nnx.Linear(n_in, n_out, use_bias=False, param_dtype=param_dtype, rngs=rngs)

        self.norm_state, self.norm_stored, self.norm_values = norm(input_size), norm(stored_size), norm(value_size)
        hidden = num_heads * head_size
        self.w_q = linear(input_size, hidden)  # W_Q
        self.w_k = linear(stored_size, hidden)  # W_K
        self.w_v = linear(value_size, hidden)  # W_V
        self.w_o = linear(hidden, output_size)  # W_O
        self.dropout = nnx.Dropout(dropout)

    def _heads(self, x: jax.Array, proj: nnx.Linear | None) -> jax.Array:
        """(B, L, D) -> (B, H, L, d): project (unless static) and split into heads."""
        if proj is None:
            return x[:, None]
        y = proj(x)
        return y.reshape(*y.shape[:2], self.num_heads, self.head_size).transpose(0, 2, 1, 3)

    def __call__(
        self,
        state_pattern: jax.Array,
        stored_pattern: jax.Array,
        pattern_projection: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        return_weights: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        values = stored_pattern if pattern_projection is None else pattern_projection
        chex.assert_rank([state_pattern, stored_pattern, values], 3)
        chex.assert_shape(state_pattern, (None, None, self.input_size))
        chex.assert_shape(stored_pattern, (state_pattern.shape[0], None, self.stored_size))
        chex.assert_shape(values, (*stored_pattern.shape[:2], self.value_size))
        if self.dropout.rate > 0 and not self.dropout.deterministic and rngs is None:
            raise ValueError("dropout > 0 in training mode needs rngs=nnx.Rngs(dropout=key) (or layer.eval())")
        xi, y, v = state_pattern, stored_pattern, values
        if self.normalize:
            xi, y, v = self.norm_state(xi), self.norm_stored(y), self.norm_values(v)
        q, k, v = self._heads(xi, self.w_q), self._heads(y, self.w_k), self._heads(v, self.w_v)
        q, _ = hopfield_iterate(q, k, self.scaling, mask, num_updates=self.update_steps - 1, tol=self.update_tol)
        weights = hopfield_weights(q, k, self.scaling, mask)
        z = jnp.einsum("bhsn,bhnd->bhsd", self.dropout(weights, rngs=rngs), v)  # (B, H, S, d)
        batch, _, queries, _ = z.shape
        z = z.transpose(0, 2, 1, 3).reshape(batch, queries, -1)  # (B, S, H d), heads concatenated
        out = z if self.w_o is None else self.w_o(z)
        return (out, weights) if return_weights else out


class HopfieldPooling(nnx.Module):
    """Hopfield pooling: ``quantity`` LEARNED state patterns retrieve from the input set.

    ``layer(stored_pattern (B, N, D), mask (B, N) bool True = keep)`` -> ``(B, quantity,
    output_size)`` (and the weights ``(B, num_heads, quantity, N)`` with ``return_weights``).
    The state patterns (queries) xi are an ``nnx.Param`` ``query`` of shape ``(quantity, D)``,
    initialised N(0, 0.02^2) like the reference, shared by the batch:

        Z = softmax(beta Q K^T) V,  Q = LN(xi) W_Q,  K = LN(Y) W_K,  V = LN(Y) W_V,

    after ``update_steps - 1`` updates of Q (equation (4)); output = concat_h(Z_h) W_O. The other
    options are :class:`Hopfield`'s (``input_size`` sizes the queries; the stored patterns, also
    the values, have ``stored_size``, by default ``input_size``). Raises ``ValueError`` for
    ``quantity < 1``, a ``value_size`` other than ``stored_size`` and :class:`Hopfield`'s errors.
    """

    def __init__(self, input_size: int, *, quantity: int = 1, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs, **options):
        quantity = _positive_int("quantity", quantity)
        stored_size = options.get("stored_size") or input_size
        value_size = options.pop("value_size", None)
        if value_size not in (None, stored_size):
            raise ValueError("HopfieldPooling reads out its input: value_size must be None or "
                             f"stored_size ({stored_size}), got {value_size}")
        self.hopfield = Hopfield(input_size, value_size=stored_size, param_dtype=param_dtype, rngs=rngs, **options)
        self.quantity = quantity
        init = jax.nn.initializers.normal(0.02)
        self.query = nnx.Param(init(rngs.params(), (quantity, self.hopfield.input_size), param_dtype))

    def __call__(self, stored_pattern: jax.Array, mask: jax.Array | None = None, *,
                 return_weights: bool = False, rngs: nnx.Rngs | None = None):
        chex.assert_rank(stored_pattern, 3)
        state = jnp.broadcast_to(self.query[...], (stored_pattern.shape[0], *self.query.shape))
        return self.hopfield(state, stored_pattern, None, mask, return_weights=return_weights, rngs=rngs)


class HopfieldLayer(nnx.Module):
    """Hopfield lookup: the input state patterns retrieve from ``quantity`` LEARNED stored patterns.

    ``layer(state_pattern (B, S, D), mask (B, quantity) bool True = keep)`` -> ``(B, S,
    output_size)`` (and the weights ``(B, num_heads, S, quantity)`` with ``return_weights``).
    The stored patterns Y (``nnx.Param`` ``stored``, ``(quantity, stored_size)``) and their values Y_v
    (``nnx.Param`` ``values``, ``(quantity, value_size)``; the same array as ``stored`` when
    ``separate_values=False``) are learned, initialised N(0, 0.02^2) like the reference:
    a learned associative memory, Z = softmax(beta Q K^T) V with K = LN(Y) W_K, V = LN(Y_v) W_V.
    The other options are :class:`Hopfield`'s. Raises ``ValueError`` for ``quantity < 1``,
    ``separate_values=False`` with ``value_size != stored_size``, and :class:`Hopfield`'s errors.
    """

    def __init__(self, input_size: int, *, quantity: int, separate_values: bool = True,
                 value_size: int | None = None, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs, **options):
        quantity = _positive_int("quantity", quantity)
        if not separate_values:
            stored_size = options.get("stored_size") or input_size
            if value_size not in (None, stored_size):
                raise ValueError("separate_values=False reads out the stored patterns: value_size must be None or "
                                 f"stored_size ({stored_size}), got {value_size}")
            value_size = stored_size
        self.hopfield = Hopfield(input_size, value_size=value_size, param_dtype=param_dtype, rngs=rngs, **options)
        self.quantity, self.separate_values = quantity, separate_values
        init = jax.nn.initializers.normal(0.02)
        self.stored = nnx.Param(init(rngs.params(), (quantity, self.hopfield.stored_size), param_dtype))
        self.values = nnx.Param(init(rngs.params(), (quantity, self.hopfield.value_size), param_dtype)) if separate_values else None

    def __call__(self, state_pattern: jax.Array, mask: jax.Array | None = None, *,
                 return_weights: bool = False, rngs: nnx.Rngs | None = None):
        chex.assert_rank(state_pattern, 3)
        batch = state_pattern.shape[0]
        stored = jnp.broadcast_to(self.stored[...], (batch, *self.stored.shape))
        values = None if self.values is None else jnp.broadcast_to(self.values[...], (batch, *self.values.shape))
        return self.hopfield(state_pattern, stored, values, mask, return_weights=return_weights, rngs=rngs)
