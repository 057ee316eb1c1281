"""A masked LSTM layer over a whole sequence, with its gradient written out (``jax.custom_vjp``).

Shapes: S steps, B batch, D input size, H hidden size; time-major. Parameters as in
``nnx.OptimizedLSTMCell`` (its ``dense_i.kernel`` W_x (D,4H), ``dense_h.kernel`` W_h (H,4H),
``dense_h.bias`` b (4H,)), gates in the order i, f, g, o:

    [i; f; g; o] = [σ; σ; tanh; σ](x_t W_x + h_{t-1} W_h + b)
    c_t = f * c_{t-1} + i * g,    h_t = o * tanh(c_t)

where ``alive[t]`` is False (past a sequence's length) the carry (c, h) is left unchanged and the
output is 0, as :func:`p2g.model.masked_lstm_scan` defines it.

Why a hand-written gradient: autodiff of ``lax.scan`` computes every step's parameter gradient
inside the reverse loop, as (B,D)^T (B,4H) products with B = 32 rows, and the input projection
x_t W_x one step at a time. Here the projections of all S steps are one (S*B, D) x (D, 4H) product
before the loop, the reverse loop only carries dh and dc back (one (B,4H) x (4H,H) product a
step) and stores each step's gate gradient dG_t, and after it

    dW_x = X^T dG,   dW_h = H_prev^T dG,   db = sum(dG),   dX = dG W_x^T

are four products over all S*B rows. Both loops stop after the last step at which any row is
alive (:func:`live_steps`, a bound known only at run time, hence ``fori_loop``s rather than
scans): batches are padded to a multiple of 8 steps, and the steps after the longest sequence
would only carry the state through. Same function, same gradient (tested in float64 against
autodiff of the step-by-step cell); P2G's training step is faster with it (docs/performance.md,
items 10 and 12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _gates(gx_t, h, c, kernel_h):
    """One step's activations from the projected input ``gx_t`` (B,4H) and the carry (B,H):
    (i, f, g, o, c_t, tanh(c_t)), each (B,H)."""
    i, f, g, o = jnp.split(gx_t + h @ kernel_h, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    return i, f, g, o, c_new, jnp.tanh(c_new)


def live_steps(alive):
    """How many leading steps have any live row: ``alive`` (S,B) -> () int32. Every step from
    there on is dead for the whole batch, so the loops stop there."""
    return jnp.max(jnp.where(jnp.any(alive, axis=1), jnp.arange(1, alive.shape[0] + 1), 0))


def _run(kernel_i, kernel_h, bias, inputs, alive, carry, keep):
    """The forward pass: (final carry, outputs (S,B,H), and with ``keep`` what the backward pass
    needs: h_{t-1}, c_{t-1}, i, f, g, o, tanh(c_t), each (S,B,H)). The loop runs the
    :func:`live_steps` only; outputs and saved values of the steps after them stay 0."""
    S, B, D = inputs.shape
    projected = (inputs.reshape(S * B, D) @ kernel_i + bias).reshape(S, B, -1)
    zeros = jnp.zeros((S,) + carry[1].shape, carry[1].dtype)

    def step(t, loop):
        (c, h), outputs, saved = loop
        alive_t = alive[t][:, None]
        i, f, g, o, c_new, tanh_c = _gates(projected[t], h, c, kernel_h)
        h_new = o * tanh_c
        outputs = outputs.at[t].set(jnp.where(alive_t, h_new, 0.0))
        if keep:
            saved = tuple(buffer.at[t].set(value) for buffer, value in zip(saved, (h, c, i, f, g, o, tanh_c)))
        return (jnp.where(alive_t, c_new, c), jnp.where(alive_t, h_new, h)), outputs, saved

    saved = (zeros,) * 7 if keep else None
    carry, outputs, saved = jax.lax.fori_loop(0, live_steps(alive), step, (carry, zeros, saved))
    return carry, outputs, saved


@jax.custom_vjp
def lstm_layer(kernel_i, kernel_h, bias, inputs, alive, carry):
    """``inputs`` (S,B,D), ``alive`` (S,B) bool, ``carry`` (c, h) each (B,H) -> (final carry
    (c, h), outputs (S,B,H)). The equations are in the module docstring."""
    carry, outputs, _ = _run(kernel_i, kernel_h, bias, inputs, alive, carry, keep=False)
    return carry, outputs


def _forward(kernel_i, kernel_h, bias, inputs, alive, carry):
    carry, outputs, saved = _run(kernel_i, kernel_h, bias, inputs, alive, carry, keep=True)
    return (carry, outputs), (kernel_i, kernel_h, inputs, alive, saved)


def _backward(residuals, cotangents):
    """Reverse loop over dh, dc (the gate gradients dG_t stored), then the parameter and input
    gradients as products over all steps at once."""
    kernel_i, kernel_h, inputs, alive, saved = residuals
    (dc_last, dh_last), d_outputs = cotangents

    def step(k, loop):
        (dc, dh), d_gates = loop
        t = steps - 1 - k
        h_prev, c_prev, i, f, g, o, tanh_c = (x[t] for x in saved)
        alive_t = alive[t][:, None]
        dh_t = dh + d_outputs[t]  # h_t feeds the next step and the output
        dc_t = dc + dh_t * o * (1.0 - tanh_c * tanh_c)
        d_gates_t = jnp.concatenate([
            dc_t * g * i * (1.0 - i),  # i
            dc_t * c_prev * f * (1.0 - f),  # f
            dc_t * i * (1.0 - g * g),  # g
            dh_t * tanh_c * o * (1.0 - o),  # o
        ], axis=-1)
        d_gates_t = jnp.where(alive_t, d_gates_t, 0.0)
        # A dead step passes the carry's gradient through untouched.
        dh_prev = jnp.where(alive_t, d_gates_t @ kernel_h_t, dh)
        dc_prev = jnp.where(alive_t, dc_t * f, dc)
        return (dc_prev, dh_prev), d_gates.at[t].set(d_gates_t)

    # Transposed once, outside the loop: written inside it, the decoder step's product took
    # 56-65 us instead of 45-47 (a trace on one core; docs/performance.md, item 12).
    kernel_h_t = kernel_h.T
    # Steps past the live ones are dead for every row: their gate gradients are 0 and the
    # carry's gradient passes them unchanged, so the reverse loop starts at the last live step.
    steps = live_steps(alive)
    d_gates = jnp.zeros(saved[2].shape[:2] + (kernel_h.shape[1],), kernel_h.dtype)
    (dc0, dh0), d_gates = jax.lax.fori_loop(0, steps, step, ((dc_last, dh_last), d_gates))
    S, B, D = inputs.shape
    d_gates = d_gates.reshape(S * B, -1)
    h_prev = saved[0].reshape(S * B, -1)
    d_kernel_i = inputs.reshape(S * B, D).T @ d_gates
    d_kernel_h = h_prev.T @ d_gates
    d_inputs = (d_gates @ kernel_i.T).reshape(S, B, D)
    return d_kernel_i, d_kernel_h, jnp.sum(d_gates, axis=0), d_inputs, None, (dc0, dh0)


lstm_layer.defvjp(_forward, _backward)


def stepped_cell_scan(cell: nnx.OptimizedLSTMCell, inputs, lengths, carry):
    """The definition :func:`lstm_layer` implements, written the plain way: ``cell`` called step
    by step inside ``lax.scan``, its gradient left to autodiff. ``inputs`` (B,S,D), ``lengths``
    (B,) -> (final carry, outputs (B,S,H)). What the tests check :func:`lstm_layer` against and
    ``python -m benchmarks.p2g_lstm`` times it against."""

    def step(carry, xs):
        x_t, t = xs
        new_carry, h = cell(carry, x_t)
        alive = (t < lengths)[:, None]
        return jax.tree.map(lambda new, old: jnp.where(alive, new, old), new_carry, carry), jnp.where(alive, h, 0.0)

    carry, outputs = jax.lax.scan(step, carry, (jnp.swapaxes(inputs, 0, 1), jnp.arange(inputs.shape[1])))
    return carry, jnp.swapaxes(outputs, 0, 1)
