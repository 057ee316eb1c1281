"""Hopfield math in float64 against autodiff, as properties over random problems."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hopfield
from hopfield import verify as verify_module
from hopfield import cccp_retrieve, energy, energy_concave, energy_convex, lse
from hopfield.verify import relative_error, run_checks
from tests.conftest import assert_plot, run_cli

pytestmark = pytest.mark.usefixtures("x64")

# A few fixed shapes (N, D) keep compilations few; values, beta and seeds vary freely.
problems = st.tuples(
    st.sampled_from([(1, 1), (1, 4), (3, 2), (12, 8)]),
    st.floats(-2.0, 3.0),  # log10 beta
    st.integers(0, 2**31 - 1),  # seed
)
SETTINGS = settings(max_examples=30, deadline=None)


def make(shape, log_beta, seed):
    n, d = shape
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(d)), jnp.asarray(rng.standard_normal((n, d))), 10.0**log_beta


def neg_e2(q, X, beta):
    return -hopfield.energy_concave(q, X, beta)


autodiff_grad_e1 = jax.jit(jax.grad(hopfield.energy_convex))
autodiff_grad_neg_e2 = jax.jit(jax.grad(neg_e2))
autodiff_grad_e = jax.jit(jax.grad(hopfield.energy))
autodiff_hess_e1 = jax.jit(jax.hessian(hopfield.energy_convex))
autodiff_hess_neg_e2 = jax.jit(jax.hessian(neg_e2))


def test_lse_is_stable_and_bounded_by_max():
    z = jnp.array([3.0, -500.0, 2.999, 700.0, 699.5])
    for beta in (1e-2, 1.0, 1e2, 1e4):
        value = float(hopfield.lse(z, beta))
        assert np.isfinite(value)
        # vecmax(z) <= lse(beta, z) <= vecmax(z) + log(N) / beta
        assert 700.0 - 1e-12 <= value <= 700.0 + np.log(len(z)) / beta + 1e-12
    naive = np.log(np.sum(np.exp(0.5 * np.array([1.0, 2.0, 3.0])))) / 0.5
    assert float(hopfield.lse(jnp.array([1.0, 2.0, 3.0]), 0.5)) == pytest.approx(naive, rel=1e-14)


@SETTINGS
@given(problems)
def test_energy_is_sum_of_convex_and_concave_parts(problem):
    q, X, beta = make(*problem)
    M2 = float(jnp.max(jnp.sum(X**2, axis=1)))
    expected = -float(hopfield.lse(X @ q, beta)) + np.log(X.shape[0]) / beta + 0.5 * float(q @ q) + 0.5 * M2
    assert float(hopfield.energy(q, X, beta)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    total = hopfield.energy_convex(q, X, beta) + hopfield.energy_concave(q, X, beta)
    assert float(total) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@SETTINGS
@given(problems)
def test_gradients_match_autodiff(problem):
    q, X, beta = make(*problem)
    assert relative_error(hopfield.grad_energy_convex(q, X, beta), autodiff_grad_e1(q, X, beta)) == 0
    assert relative_error(hopfield.grad_neg_energy_concave(q, X, beta), autodiff_grad_neg_e2(q, X, beta)) < 1e-10
    full = autodiff_grad_e(q, X, beta)
    analytic = hopfield.grad_energy_convex(q, X, beta) - hopfield.grad_neg_energy_concave(q, X, beta)
    assert relative_error(analytic, full, scale=1.0 + jnp.max(jnp.abs(X)) + jnp.max(jnp.abs(q))) < 1e-12


@SETTINGS
@given(problems)
def test_hessians_match_autodiff_and_are_psd(problem):
    q, X, beta = make(*problem)
    h1 = hopfield.hessian_energy_convex(q, X, beta)
    h2 = hopfield.hessian_neg_energy_concave(q, X, beta)
    assert relative_error(h1, autodiff_hess_e1(q, X, beta)) == 0
    p = hopfield.attention_weights(q, X, beta)
    scale = beta * jnp.max(jnp.abs((X * p[:, None]).T @ X))
    assert relative_error(h2, autodiff_hess_neg_e2(q, X, beta), scale) < 1e-10
    assert jnp.allclose(h2, h2.T, rtol=0, atol=1e-14 * float(scale))
    eig = np.linalg.eigvalsh(np.asarray(h2))
    assert eig.min() >= -1e-13 * max(float(scale), 1e-300)
    np.testing.assert_array_equal(np.linalg.eigvalsh(np.asarray(h1)), np.ones(q.shape[0]))


retrieve_30_steps = jax.jit(lambda q, X, beta: hopfield.cccp_retrieve(q, X, beta, max_steps=30, tol=0.0))


@SETTINGS
@given(problems)
def test_cccp_never_increases_energy(problem):
    q, X, beta = make(*problem)
    result = retrieve_30_steps(q, X, beta)
    energies = np.asarray(result.energies)
    assert np.all(np.isfinite(energies))  # tol = 0: all 30 steps are taken
    scale = 1.0 + float(jnp.max(jnp.sum(X**2, 1)) + q @ q) + np.log(X.shape[0]) / beta
    assert np.max(np.diff(energies)) <= 1e-13 * scale


def test_cccp_step_is_the_convex_problem_minimiser():
    """q_{t+1} minimises E1(q) + <grad E2(q_t), q>: its gradient q + grad E2(q_t) vanishes there."""
    rng = np.random.default_rng(1)
    q, X = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal((9, 6)))
    q_next = hopfield.cccp_step(q, X, 0.7)
    linearised = lambda v: hopfield.energy_convex(v, X, 0.7) + jax.grad(hopfield.energy_concave)(q, X, 0.7) @ v
    np.testing.assert_allclose(jax.grad(linearised)(q_next), 0.0, atol=1e-14)


def test_retrieves_stored_pattern_from_corrupted_query():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 64))
    target = 7
    q = X[target].copy()
    q[32:] = 0.0  # half masked
    q += 0.3 * rng.standard_normal(64)
    result = hopfield.cccp_retrieve(jnp.asarray(q), jnp.asarray(X), beta=1.0, max_steps=20, tol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q), X[target], atol=1e-8)
    assert int(result.steps) <= 3  # one update lands on the pattern, the next confirms it
    # at tiny beta the fixed point is the mean of the stored patterns instead
    avg = hopfield.cccp_retrieve(jnp.asarray(q), jnp.asarray(X), beta=1e-6, max_steps=20, tol=1e-12)
    np.testing.assert_allclose(np.asarray(avg.q), X.mean(axis=0), atol=1e-3)


def test_stable_at_very_large_beta():
    rng = np.random.default_rng(2)
    q, X = jnp.asarray(rng.standard_normal(5)), jnp.asarray(100 * rng.standard_normal((8, 5)))
    for beta in (1e3, 1e4):
        values = [
            hopfield.energy(q, X, beta),
            hopfield.grad_neg_energy_concave(q, X, beta),
            hopfield.hessian_neg_energy_concave(q, X, beta),
            hopfield.cccp_retrieve(q, X, beta, 10, 1e-8).q,
        ]
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in values)
    # the argmax pattern is reached in one step
    best = int(jnp.argmax(X @ q))
    np.testing.assert_allclose(hopfield.cccp_step(q, X, 1e4), X[best], rtol=1e-12)


cccp_step = jax.jit(hopfield.cccp_step)
cccp_step_batch = jax.jit(hopfield.cccp_step_batch)
cross_attention = jax.jit(hopfield.cross_attention)
jax_attention = jax.jit(hopfield.jax_attention)


@SETTINGS
@given(problems, st.sampled_from([1, 5]))
def test_cccp_step_is_cross_attention(problem, m):
    _, X, _ = make(*problem)
    Q = jnp.asarray(np.random.default_rng(problem[2] + 1).standard_normal((m, X.shape[1])))
    beta = 1.0 / np.sqrt(X.shape[1])
    rows = np.stack([np.asarray(cccp_step(Q[i], X, beta)) for i in range(m)])
    scale = jnp.max(jnp.abs(X))
    assert relative_error(cross_attention(Q, X, X), rows, scale) < 1e-13
    assert relative_error(cccp_step_batch(Q, X, beta), rows, scale) < 1e-13
    assert relative_error(jax_attention(Q, X), rows, scale) < 1e-5  # jax: float32 softmax


def test_classic_network_stores_few_patterns_and_fails_beyond_capacity():
    rng = np.random.default_rng(3)
    D = 64

    def recovered(n):
        X = np.where(rng.random((n, D)) < 0.5, -1.0, 1.0)
        W = hopfield.classic_weights(jnp.asarray(X))
        Q = X.copy()
        for row in Q:
            row[rng.choice(D, 3, replace=False)] *= -1  # 3 bits flipped
        final = jax.vmap(lambda q: hopfield.classic_retrieve(q, W).q)(jnp.asarray(Q))
        return float(np.mean(np.all(np.asarray(final) == X, axis=1)))

    assert recovered(2) == 1.0
    assert recovered(40) < 0.2  # N/D = 0.6, far past 0.138


def test_verify_passes_and_catches_a_wrong_hessian(monkeypatch):
    checks = run_checks(trials=8, shapes=((3, 2), (16, 5)))
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]

    def missing_outer_product(q, X, beta):
        p = hopfield.attention_weights(q, X, beta)
        return beta * (X * p[:, None]).T @ X  # forgets - p p^T

    monkeypatch.setattr(verify_module, "hessian_neg_energy_concave", missing_outer_product)
    monkeypatch.setattr(verify_module, "_checks_batch", jax.jit(
        jax.vmap(verify_module._per_problem, in_axes=(0, 0, 0, 0, None)), static_argnums=4))
    failed = {c.name for c in run_checks(trials=8, shapes=((3, 2),)) if not c.passed}
    assert any(name.startswith("hess(-E2) =") for name in failed)


@pytest.mark.slow
def test_cli_verify_prints_table_and_passes():
    proc = run_cli("experiments.hopfield", "verify", "--trials", "4")
    assert proc.returncode == 0, proc.stderr
    assert "9/9 checks passed" in proc.stdout
    assert proc.stdout.count("PASS") == 9


@pytest.mark.slow
def test_cli_retrieve_writes_plots(tmp_path):
    out = tmp_path / "hop"
    proc = run_cli(
        "experiments.hopfield", "retrieve", "--patterns", "6", "--dim", "64", "--betas", "4",
        "--capacity-dim", "16", "--capacity-points", "3", "--lookup-steps", "100", "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("retrieval_vs_beta.png", "retrieval_examples.png", "energy_trajectory.png", "capacity.png",
                 "lookup_examples.png"):
        assert_plot(out / name)
    import json

    summary = json.loads((out / "retrieval.json").read_text())
    assert summary["retrieved"][-1] == 1.0  # largest beta retrieves every pattern
    assert summary["layer_path"]["max_relative_gap"] < 1e-5  # the static layer is the CCCP update
    assert summary["lookup_after_training"]["identified"] == 1.0  # the trained layer finds each pattern


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    missing = run_cli("experiments.hopfield", "retrieve", "--images", str(tmp_path / "nope.npz"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr
    bad_flag = run_cli("experiments.hopfield", "verify", "--trials", "-3")
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.strip().count("\n") == 0 and "--trials" in bad_flag.stderr


def test_float32_under_jit_stays_finite_for_large_beta_and_raw_pixels():
    """32 raw-pixel patterns (0..255, D = 6912), half-masked queries, beta = 100, float32 under
    jit: one CCCP step, the batched step and retrieval stay finite and agree with the un-jitted
    step; the query converges to its pattern."""
    from hopfield.attention import cccp_step_batch

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.integers(0, 256, (32, 6912)).astype(np.float32))
    Q = X.at[:, 3456:].set(0.0)
    jitted, eager = jax.jit(cccp_step_batch)(Q, X, 100.0), cccp_step_batch(Q, X, 100.0)
    assert bool(jnp.all(jnp.isfinite(jitted)))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(jitted, X, rtol=1e-6)  # each half query retrieves its own pattern
    result = jax.jit(jax.vmap(lambda q: cccp_retrieve(q, X, 100.0)))(Q)
    assert bool(jnp.all(result.converged)) and bool(jnp.all(jnp.isfinite(result.q)))
    assert bool(jnp.all(jnp.isfinite(jax.vmap(lambda q: energy(q, X, 100.0))(Q))))


def test_lse_subtracts_the_max_before_scaling():
    z = jnp.array([1e30, 1e30 - 1e24, -1e30], jnp.float32)  # beta * z overflows float32
    assert float(lse(z, 1e10)) == pytest.approx(1e30, rel=1e-6)
    np.testing.assert_allclose(jax.grad(lambda z: lse(z, 1e10))(z), [1.0, 0.0, 0.0], atol=1e-6)


def test_a_non_finite_state_is_never_reported_as_converged():
    X = jnp.eye(3)
    result = cccp_retrieve(jnp.array([jnp.nan, 0.0, 0.0]), X, 1.0)
    assert not bool(result.converged) and int(result.steps) == 1
    assert bool(cccp_retrieve(jnp.array([1.0, 0.0, 0.0]), X, 8.0).converged)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), float("nan")])
def test_beta_must_be_positive_and_finite(beta):
    q, X = jnp.ones(2), jnp.eye(2)
    for fn in (energy, energy_convex, energy_concave, hopfield.cccp_step):
        with pytest.raises(ValueError, match="beta must be positive"):
            fn(q, X, beta)
