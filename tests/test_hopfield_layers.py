"""Hopfield layers (hopfield/layers.py) against the pure Hopfield functions, in float64 where the
comparison is exact, and in float32 under jit where numerical safety is the point."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import hopfield
from hopfield import (
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    hopfield_iterate,
    hopfield_update,
    masked_softmax,
)
from hopfield.energy import softmax as energy_softmax


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def static_layer(d, beta, update_steps=1, update_tol=0.0, **kw):
    return Hopfield(d, static=True, normalize=False, scaling=beta, update_steps=update_steps,
                    update_tol=update_tol, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)


def compiled(module, return_weights=False):
    """``module(*args)`` jit-compiled (its parameters as constants): one compilation per shape
    instead of one per operation, which keeps the tests fast."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda *args: nnx.merge(graphdef, state)(*args, return_weights=return_weights))


def np_softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------- the softmax


def test_masked_softmax_is_energy_softmax_over_the_kept_entries(x64):
    z = jnp.asarray(normal(0, 3, 6))
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
    assert jnp.array_equal(masked_softmax(z, 1.7), energy_softmax(z, 1.7))
    chex.assert_trees_all_close(masked_softmax(z, 1.7, jnp.ones(6, bool)), energy_softmax(z, 1.7),
                                rtol=1e-15, atol=0)
    p = np.asarray(masked_softmax(z, 1.7, mask))
    assert np.all(p[~np.asarray(mask)] == 0.0)  # exactly zero where masked
    np.testing.assert_allclose(p[1, [0, 2, 5]], np_softmax(1.7 * np.asarray(z)[1, [0, 2, 5]]), rtol=1e-14)
    np.testing.assert_array_equal(p[2], 0.0)  # a fully masked row is all zeros, not NaN
    grad = jax.grad(lambda z: jnp.sum(masked_softmax(z, 1.7, mask) * jnp.arange(6.0)))(z)
    assert bool(jnp.all(jnp.isfinite(grad))) and np.all(np.asarray(grad)[~np.asarray(mask)] == 0.0)


def test_masked_softmax_subtracts_the_max_before_scaling_in_float32_under_jit():
    z = jnp.array([[1e36, 1e36 - 1e30, -1e36], [1e36, 1e36 - 1e30, -1e36]], jnp.float32)  # beta z overflows
    mask = jnp.array([[True, True, True], [False, True, True]])
    p = jax.jit(masked_softmax)(z, 1e4, mask)
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert not bool(jnp.all(jnp.isfinite(jax.nn.softmax(1e4 * z))))  # what the naive form gives


# ------------------------------------------------------------------- static layer == CCCP steps


def test_static_layer_one_step_is_cccp_step_batch(x64):
    beta, X, Q = 0.8, normal(1, 2, 7, 5), normal(2, 2, 4, 5)
    out, weights = static_layer(5, beta)(jnp.asarray(Q), jnp.asarray(X), return_weights=True)
    assert out.shape == (2, 4, 5) and weights.shape == (2, 1, 4, 7)
    for b in range(2):  # each batch item retrieves from its own memory
        chex.assert_trees_all_close(out[b], hopfield.cccp_step_batch(jnp.asarray(Q[b]), jnp.asarray(X[b]), beta),
                                    rtol=1e-12, atol=1e-12)
        for s in range(4):
            chex.assert_trees_all_close(weights[b, 0, s], hopfield.attention_weights(Q[b, s], X[b], beta),
                                        rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [2, 4])
def test_static_layer_k_steps_are_k_cccp_updates(x64, steps):
    beta, X, Q = 1.3, jnp.asarray(normal(3, 1, 6, 4)), jnp.asarray(normal(4, 1, 3, 4))
    out = static_layer(4, beta, update_steps=steps)(Q, X)
    for s in range(3):
        q = Q[0, s]
        for _ in range(steps):
            q = hopfield.cccp_step(q, X[0], beta)
        chex.assert_trees_all_close(out[0, s], q, rtol=1e-12, atol=1e-12)
    # and a different count gives a different result (the steps are really taken)
    assert not np.allclose(out, static_layer(4, beta, update_steps=steps - 1)(Q, X), atol=1e-6)


def test_early_stopping_is_per_query_and_matches_cccp_retrieve(x64):
    beta, tol, k = 2.0, 1e-3, 12
    X = jnp.asarray(normal(5, 8, 6))
    Q = jnp.asarray(np.concatenate([np.asarray(X[:2]) + 0.05 * normal(6, 2, 6), 0.3 * normal(7, 3, 6)]))
    retrieved = jax.jit(jax.vmap(lambda q: hopfield.cccp_retrieve(q, X, beta, max_steps=k - 1, tol=tol)))(Q)
    expected = [jax.tree.map(lambda a: a[s], retrieved) for s in range(len(Q))]
    state, count = hopfield_iterate(Q[None, None], X[None, None], beta, num_updates=k - 1, tol=tol)
    np.testing.assert_array_equal(count[0, 0], [int(r.steps) for r in expected])
    assert len(set(np.asarray(count[0, 0]).tolist())) > 1  # queries stopped at different steps
    for s, r in enumerate(expected):
        chex.assert_trees_all_close(state[0, 0, s], r.q, rtol=1e-12, atol=1e-12)
    out = static_layer(6, beta, update_steps=k, update_tol=tol)(Q[None], X[None])
    for s, r in enumerate(expected):  # the read-out is one more CCCP step from the stopped state
        chex.assert_trees_all_close(out[0, s], hopfield.cccp_step(r.q, X, beta), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ learned projections, several heads


def np_layer(layer, xi, Y, V, steps):
    """Layer (normalize=True, no dropout) written out head by head in numpy."""
    def ln(x, norm):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + norm.epsilon)
        return x * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])

    H, d, beta = layer.num_heads, layer.head_size, layer.scaling
    Wq, Wk, Wv, Wo = (np.asarray(w.kernel[...]) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
    xi, Y, V = ln(xi, layer.norm_state), ln(Y, layer.norm_stored), ln(V, layer.norm_values)
    out = []
    for b in range(xi.shape[0]):
        heads = []
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            q, k, v = xi[b] @ Wq[:, cols], Y[b] @ Wk[:, cols], V[b] @ Wv[:, cols]
            for _ in range(steps - 1):
                q = np_softmax(beta * q @ k.T) @ k
            heads.append(np_softmax(beta * q @ k.T) @ v)
        out.append(np.concatenate(heads, axis=-1) @ Wo)
    return np.stack(out)


def test_multi_head_layer_matches_a_head_by_head_reference(x64):
    layer = Hopfield(6, num_heads=2, head_size=3, output_size=5, stored_size=4, value_size=7, update_steps=3,
                     param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    assert layer.scaling == pytest.approx(1 / np.sqrt(3))  # default beta = 1/sqrt(head_size)
    for norm, seed in ((layer.norm_state, 10), (layer.norm_stored, 11), (layer.norm_values, 12)):
        norm.scale[...] = 1.0 + 0.3 * normal(seed, *norm.scale.shape)  # non-trivial affine LayerNorms
        norm.bias[...] = 0.3 * normal(seed + 5, *norm.bias.shape)
    xi, Y, V = normal(20, 2, 3, 6), normal(21, 2, 5, 4), normal(22, 2, 5, 7)
    out = compiled(layer)(jnp.asarray(xi), jnp.asarray(Y), jnp.asarray(V))
    chex.assert_trees_all_close(out, np_layer(layer, xi, Y, V, steps=3), rtol=1e-11, atol=1e-12)


def test_output_shapes_batch_independence_jit_and_vmap():
    rngs = nnx.Rngs(2)
    xi, Y = jnp.asarray(normal(30, 3, 5, 8), jnp.float32), jnp.asarray(normal(31, 3, 7, 8), jnp.float32)
    layer = Hopfield(8, num_heads=4, output_size=3, update_steps=2, rngs=rngs)
    out, w = compiled(layer, return_weights=True)(xi, Y)
    assert out.shape == (3, 5, 3) and w.shape == (3, 4, 5, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    chex.assert_trees_all_close(compiled(layer)(xi[1:2], Y[1:2]), out[1:2], rtol=1e-5, atol=1e-6)  # no cross-talk

    pool = HopfieldPooling(8, quantity=2, num_heads=2, output_size=6, rngs=rngs)
    pooled, pw = compiled(pool, return_weights=True)(Y)
    assert pooled.shape == (3, 2, 6) and pw.shape == (3, 2, 2, 7)
    lookup = HopfieldLayer(8, quantity=9, num_heads=2, output_size=4, value_size=5, rngs=rngs)
    looked, lw = compiled(lookup, return_weights=True)(xi)
    assert looked.shape == (3, 5, 4) and lw.shape == (3, 2, 5, 9)

    graphdef, state = nnx.split(layer)
    apply = lambda state, xi, Y: nnx.merge(graphdef, state)(xi, Y)  # noqa: E731
    stacked = jax.jit(jax.vmap(apply, in_axes=(None, 0, 0)))(state, jnp.stack([xi, xi[::-1]]), jnp.stack([Y, Y[::-1]]))
    chex.assert_trees_all_close(stacked[1], out[::-1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- masks


def test_masked_patterns_get_zero_weight_and_their_values_never_matter():
    layer = Hopfield(4, num_heads=2, update_steps=3, value_size=3, rngs=nnx.Rngs(3))
    xi, Y, V = (jnp.asarray(normal(s, *shape), jnp.float32) for s, shape in
                ((40, (3, 2, 4)), (41, (3, 6, 4)), (42, (3, 6, 3))))
    mask = jnp.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    run = compiled(layer, return_weights=True)
    out, w = run(xi, Y, V, mask)
    masked = ~np.asarray(mask)
    assert np.all(np.asarray(w).transpose(0, 3, 1, 2)[masked] == 0.0)
    np.testing.assert_allclose(w[:2].sum(-1), 1.0, rtol=1e-6)
    # changing the masked stored patterns and values (to large values) changes nothing at all
    junk = lambda a, s: jnp.where(mask[..., None], a, 1e4 * jnp.asarray(normal(s, *a.shape), a.dtype))  # noqa: E731
    np.testing.assert_array_equal(run(xi, junk(Y, 43), junk(V, 44), mask)[0], out)
    # the same as dropping them
    for b in range(2):
        keep = np.flatnonzero(np.asarray(mask[b]))
        chex.assert_trees_all_close(run(xi[b:b + 1], Y[b:b + 1, keep], V[b:b + 1, keep])[0][0], out[b],
                                    rtol=1e-5, atol=1e-6)
    # a fully masked item reads out zeros, with finite gradients
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(w[2], 0.0)
    grads = jax.jit(jax.grad(lambda Y: jnp.sum(run(xi, Y, V, mask)[0] ** 2)))(Y)
    assert bool(jnp.all(jnp.isfinite(grads))) and np.all(np.asarray(grads)[masked] == 0.0)


# ------------------------------------------------------------------------------------- gradients


def test_gradients_through_several_update_steps_match_finite_differences(x64):
    state, stored, values = (jnp.asarray(normal(s, *shape)) for s, shape in
                             ((50, (2, 2, 3, 3)), (51, (2, 2, 4, 3)), (52, (2, 2, 4, 2))))
    mask = jnp.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)

    @jax.jit
    def retrieve(state, stored, values, beta):
        return hopfield_update(state, stored, values, beta, mask, update_steps=3)[0]

    check_grads(retrieve, (state, stored, values, 0.9), order=1, modes=("rev",))
    # the gradient really flows through the state updates: it differs from one step's
    one_step = jax.jit(jax.grad(lambda s: jnp.sum(hopfield_update(s, stored, values, 0.9, mask)[0])))(state)
    three = jax.jit(jax.grad(lambda s: jnp.sum(retrieve(s, stored, values, 0.9))))(state)
    assert not np.allclose(one_step, three, atol=1e-6)


def test_pooling_queries_are_learned_params_that_receive_gradients():
    pool = HopfieldPooling(6, quantity=3, num_heads=2, update_steps=2, rngs=nnx.Rngs(4))
    params = nnx.state(pool, nnx.Param)
    assert params["query"].shape == (3, 6)
    Y = jnp.asarray(normal(60, 2, 5, 6), jnp.float32)
    target = jnp.asarray(normal(61, 2, 3, 6), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(Y) * target)))(pool)
    assert float(jnp.linalg.norm(grads["query"][...])) > 1e-6


def test_pooling_query_is_the_state_pattern(x64):
    beta = 0.6
    pool = HopfieldPooling(5, quantity=3, static=True, normalize=False, scaling=beta,
                           param_dtype=jnp.float64, rngs=nnx.Rngs(5))
    pool.query[...] = jnp.asarray(normal(62, 3, 5))  # a non-trivial query
    X = jnp.asarray(normal(63, 2, 8, 5))
    out = pool(X)
    for b in range(2):
        chex.assert_trees_all_close(out[b], hopfield.cccp_step_batch(pool.query[...], X[b], beta),
                                    rtol=1e-12, atol=1e-12)


def test_hopfield_layer_stored_patterns_and_values_are_learned_params(x64):
    beta = 0.9
    layer = HopfieldLayer(4, quantity=5, value_size=3, static=True, normalize=False, scaling=beta,
                          param_dtype=jnp.float64, rngs=nnx.Rngs(6))
    params = nnx.state(layer, nnx.Param)
    assert params["stored"].shape == (5, 4) and params["values"].shape == (5, 3)
    layer.stored[...], layer.values[...] = jnp.asarray(normal(70, 5, 4)), jnp.asarray(normal(71, 5, 3))
    xi = normal(72, 2, 3, 4)
    expected = np_softmax(beta * xi @ np.asarray(layer.stored[...]).T) @ np.asarray(layer.values[...])
    chex.assert_trees_all_close(layer(jnp.asarray(xi)), expected, rtol=1e-12, atol=1e-12)
    target = jnp.asarray(normal(73, 2, 3, 3))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(jnp.asarray(xi)) * target)))(layer)
    assert float(jnp.linalg.norm(grads["stored"][...])) > 1e-6
    assert float(jnp.linalg.norm(grads["values"][...])) > 1e-6


# ------------------------------------------------------------------------- large beta, float32


def test_large_beta_and_raw_pixel_inputs_stay_finite_in_float32_under_jit():
    rng = np.random.default_rng(8)
    X = rng.integers(0, 256, (1, 16, 32)).astype(np.float32)
    Q = X[:, :4].copy()
    Q[..., 16:] = 0.0  # half-masked queries
    mask = np.ones((1, 16), bool)
    mask[0, np.argmax(Q[0, 0] @ X[0].T)] = False  # query 0's best pattern is masked (for every query)
    expected = Q[0].astype(np.float64)
    for _ in range(2):  # at beta = 1e4 a step jumps to the best kept pattern (scores exact: integers < 2^24)
        scores = np.where(mask[0], expected @ X[0].T.astype(np.float64), -np.inf)
        top2 = np.sort(scores, axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] >= 1)  # no ties, so the weights are exactly one-hot
        expected = X[0, np.argmax(scores, axis=1)].astype(np.float64)

    static = Hopfield(32, static=True, normalize=False, scaling=1e4, update_steps=2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(static)
    out, w = jax.jit(lambda s, q, x, m: nnx.merge(graphdef, s)(q, x, mask=m, return_weights=True))(
        state, jnp.asarray(Q), jnp.asarray(X), jnp.asarray(mask))
    np.testing.assert_array_equal(out[0], expected)  # exactly the retrieved raw pixels
    assert set(np.unique(np.asarray(w)).tolist()) == {0.0, 1.0}

    xi, Y = jnp.asarray(Q), jnp.asarray(X)
    for module in (Hopfield(32, num_heads=2, scaling=1e4, update_steps=3, rngs=nnx.Rngs(1)),
                   Hopfield(32, num_heads=2, scaling=1e4, update_steps=3, normalize=False, rngs=nnx.Rngs(1)),
                   HopfieldPooling(32, quantity=2, scaling=1e4, update_steps=3, normalize=False, rngs=nnx.Rngs(1)),
                   HopfieldLayer(32, quantity=8, scaling=1e4, update_steps=3, normalize=False, rngs=nnx.Rngs(1))):
        args = (xi, Y) if isinstance(module, Hopfield) else (Y,) if isinstance(module, HopfieldPooling) else (255 * xi,)

        @nnx.jit
        def value_and_grad(m, args):
            return nnx.value_and_grad(lambda m: jnp.sum(m(*args)))(m)

        loss, grads = value_and_grad(module, args)
        assert np.isfinite(float(loss)), type(module).__name__
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), type(module).__name__


# ------------------------------------------------------------------------------------- dropout


def test_dropout_on_the_weights_in_training_mode_only(x64):
    beta, X, Q = 0.5, jnp.asarray(normal(80, 1, 10, 4)), jnp.asarray(normal(81, 1, 6, 4))
    layer = static_layer(4, beta, dropout=0.5)
    a = layer(Q, X, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(a, hopfield.cccp_step_batch(Q[0], X[0], beta)[None])
    np.testing.assert_array_equal(a, layer(Q, X, rngs=nnx.Rngs(dropout=0)))  # the key decides
    assert not np.allclose(a, layer(Q, X, rngs=nnx.Rngs(dropout=1)))
    with pytest.raises(ValueError, match="rngs"):
        layer(Q, X)
    layer.eval()
    chex.assert_trees_all_close(layer(Q, X), hopfield.cccp_step_batch(Q[0], X[0], beta)[None], rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(static=True, num_heads=2), "num_heads must be 1"),
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(scaling=0.0), "scaling"),
    (dict(scaling=-1.0), "scaling"),
    (dict(scaling=float("nan")), "scaling"),
    (dict(update_steps=0), "update_steps"),
    (dict(update_tol=-1e-3), "update_tol"),
    (dict(dropout=1.0), "dropout"),
    (dict(static=True, output_size=3), "output_size"),
    (dict(static=True, stored_size=4), "stored_size"),
    (dict(static=True, head_size=2), "head_size"),
])
def test_inconsistent_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Hopfield(8, rngs=nnx.Rngs(0), **kwargs)


def test_other_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="quantity"):
        HopfieldPooling(8, quantity=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quantity"):
        HopfieldLayer(8, quantity=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="value_size"):
        HopfieldLayer(8, quantity=2, separate_values=False, value_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="value_size"):
        HopfieldPooling(8, value_size=3, rngs=nnx.Rngs(0))
    q = jnp.ones((1, 1, 2, 3))
    with pytest.raises(ValueError, match="update_steps"):
        hopfield_update(q, q, q, 1.0, update_steps=0)
    with pytest.raises(ValueError, match="beta must be positive"):
        hopfield_update(q, q, q, 0.0)
