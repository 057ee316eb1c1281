"""A masked LSTM layer over whole words, with its gradient written out (``jax.custom_vjp``).

Shapes: B words, P rows, D input size, H hidden size. The words are laid end to end in the rows
of ``inputs`` (P,D): word b at rows starts[b] .. starts[b] + lengths[b] - 1 (a padded (B,S)
batch is the layout with starts b*S, :class:`p2g.xla_cpu.LSTM`).
Parameters as in ``nnx.OptimizedLSTMCell`` (its ``dense_i.kernel`` W_x (D,4H), ``dense_h.kernel``
W_h (H,4H), ``dense_h.bias`` b (4H,)), gates in the order i, f, g, o; step t of word b reads row
r = starts[b] + t (``reverse``: starts[b] + lengths[b] - 1 - t):

    [i; f; g; o] = [σ; σ; tanh; σ](x_r W_x + h_{t-1} W_h + b)
    c_t = f * c_{t-1} + i * g,    h_t = o * tanh(c_t),    output row r = h_t

past a word's length its carry (c, h) is left unchanged; rows no word covers output 0.

Why a hand-written gradient: autodiff of ``lax.scan`` computes every step's parameter gradient
inside the reverse loop, as (B,D)^T (B,4H) products, and the input projection one step at a time.
Here the projections of all rows are one (P, D) x (D, 4H) product before the loop; each step
gathers its B rows. The reverse loop only carries dh and dc back (one (B,4H) x (4H,H) product a
step) and stores each step's gate gradient dG at its rows, and after it

    dW_x = X^T dG,   dW_h = H_prev^T dG,   db = sum(dG),   dX = dG W_x^T

are four products over the P rows. Both
loops run max(lengths) steps, a bound known only at run time, hence ``fori_loop``s. Same function,
same gradient (tested in float64 against autodiff of the step-by-step cell).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _gates(gx_t, h, c, kernel_h):
    """One step's activations from the projected input ``gx_t`` (B,4H) and the carry (B,H):
    (i, f, g, o, c_t, tanh(c_t)), each (B,H)."""
    i, f, g, o = jnp.split(gx_t + h @ kernel_h, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    return i, f, g, o, c_new, jnp.tanh(c_new)


def step_rows(starts, lengths, t, reverse: bool, rows: int):
    """Which row each word reads at step ``t``: (alive (B,) bool, row (B,) int32). Word b covers
    rows starts[b] .. starts[b] + lengths[b] - 1 and steps through them in order, or backwards
    with ``reverse``; past its length it is dead and its row is ``rows`` (out of bounds: reads
    give 0, writes are dropped)."""
    alive = t < lengths
    row = starts + (lengths - 1 - t if reverse else t)
    return alive, jnp.where(alive, row, rows)


def _take(x, row):
    return x.at[row].get(mode="fill", fill_value=0)


def _run(reverse, kernel_i, kernel_h, bias, inputs, starts, lengths, carry, keep):
    """The forward pass: (final carry, outputs (P,H), and with ``keep`` what the backward pass
    needs, [h_{t-1}, c_{t-1}, i, f, g, o, tanh(c_t)] (P,7H), at each step's row). The loop runs
    max(lengths) steps; rows no word covers stay 0."""
    P = inputs.shape[0]
    H = kernel_h.shape[0]
    projected = inputs @ kernel_i + bias

    def step(t, loop):
        (c, h), outputs, saved = loop
        alive, row = step_rows(starts, lengths, t, reverse, P)
        i, f, g, o, c_new, tanh_c = _gates(_take(projected, row), h, c, kernel_h)
        h_new = o * tanh_c
        outputs = outputs.at[row].set(h_new, mode="drop")
        if keep:
            saved = saved.at[row].set(jnp.concatenate([h, c, i, f, g, o, tanh_c], axis=-1), mode="drop")
        alive = alive[:, None]
        return (jnp.where(alive, c_new, c), jnp.where(alive, h_new, h)), outputs, saved

    zeros = lambda n: jnp.zeros((P, n * H), projected.dtype)
    saved = zeros(7) if keep else None
    return jax.lax.fori_loop(0, jnp.max(lengths, initial=0), step, (carry, zeros(1), saved))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def lstm_layer(reverse, kernel_i, kernel_h, bias, inputs, starts, lengths, carry):
    """Words laid end to end in ``inputs`` (P,D), word b at rows ``starts[b]`` .. ``starts[b] +
    lengths[b] - 1`` (``starts``, ``lengths`` (B,) int; ``reverse``: read each word last row
    first), initial ``carry`` (c, h) each (B,H) -> (final carry (c, h), outputs (P,H), each at
    its input's row, 0 on rows no word covers). The equations are in the module docstring."""
    carry, outputs, _ = _run(reverse, kernel_i, kernel_h, bias, inputs, starts, lengths, carry, keep=False)
    return carry, outputs


def _forward(reverse, kernel_i, kernel_h, bias, inputs, starts, lengths, carry):
    carry, outputs, saved = _run(reverse, kernel_i, kernel_h, bias, inputs, starts, lengths, carry, keep=True)
    return (carry, outputs), (kernel_i, kernel_h, inputs, starts, lengths, saved)


def _backward(reverse, residuals, cotangents):
    """Reverse loop over dh, dc (the gate gradients dG stored at each step's row), then the
    parameter and input gradients as products over all P rows at once."""
    kernel_i, kernel_h, inputs, starts, lengths, saved = residuals
    (dc_last, dh_last), d_outputs = cotangents
    P, H = inputs.shape[0], kernel_h.shape[0]

    def step(k, loop):
        (dc, dh), d_gates = loop
        alive, row = step_rows(starts, lengths, steps - 1 - k, reverse, P)
        h_prev, c_prev, i, f, g, o, tanh_c = jnp.split(_take(saved, row), 7, axis=-1)
        alive = alive[:, None]
        dh_t = dh + _take(d_outputs, row)  # h_t feeds the next step and the output
        dc_t = dc + dh_t * o * (1.0 - tanh_c * tanh_c)
        d_gates_t = jnp.concatenate([
            dc_t * g * i * (1.0 - i),  # i
            dc_t * c_prev * f * (1.0 - f),  # f
            dc_t * i * (1.0 - g * g),  # g
            dh_t * tanh_c * o * (1.0 - o),  # o
        ], axis=-1)
        # A dead step passes the carry's gradient through untouched (its row is dropped).
        dh_prev = jnp.where(alive, d_gates_t @ kernel_h_t, dh)
        dc_prev = jnp.where(alive, dc_t * f, dc)
        return (dc_prev, dh_prev), d_gates.at[row].set(d_gates_t, mode="drop")

    # Transposed once, outside the loop: inside it the step's product was slower (docs/performance.md).
    kernel_h_t = kernel_h.T
    steps = jnp.max(lengths, initial=0)
    d_gates = jnp.zeros((P, 4 * H), kernel_h.dtype)
    (dc0, dh0), d_gates = jax.lax.fori_loop(0, steps, step, ((dc_last, dh_last), d_gates))
    d_kernel_i = inputs.T @ d_gates
    d_kernel_h = saved[:, :H].T @ d_gates
    d_inputs = d_gates @ kernel_i.T
    return d_kernel_i, d_kernel_h, jnp.sum(d_gates, axis=0), d_inputs, None, None, (dc0, dh0)


lstm_layer.defvjp(_forward, _backward)
