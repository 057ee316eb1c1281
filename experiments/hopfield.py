"""Modern Hopfield networks: verify the math, demonstrate retrieval.

    python -m experiments.hopfield verify [--trials 64] [--seed 0]
    python -m experiments.hopfield retrieve [--images FILE.npz] [--patterns 32] [--out runs/hopfield]

``verify`` runs the randomised float64 checks of :mod:`hopfield.verify`, prints one table and
exits 1 if any check fails. ``retrieve`` stores patterns, corrupts queries (half masked, plus
noise), retrieves them by CCCP for a sweep of beta and writes PNG plots and ``retrieval.json``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments._plots import pyplot
from common.npz import Npz, NpzError
from experiments._cli import (ArgumentParser, UserError, folder, non_negative_int, positive_float, positive_int, run, seed,
                              unit_interval, warn, write_json)
from hopfield import binary_sign, cccp_retrieve, classic_retrieve, classic_weights
from hopfield.verify import run_checks


# ----------------------------------------------------------------------------------------------
# verify


def cmd_verify(args) -> int:
    start = time.perf_counter()
    checks = run_checks(trials=args.trials, seed=args.seed, beta_min=args.beta_min, beta_max=args.beta_max)
    width = max(len(c.name) for c in checks)
    print(f"{'check':<{width}}  {'value':>11}  {'bound':>11}  result  measure")
    for c in checks:
        relation = ">=" if c.at_least else "<="
        print(
            f"{c.name:<{width}}  {c.value:>11.3e}  {relation}{c.bound:>9.1e}  "
            f"{'PASS' if c.passed else 'FAIL':<6}  {c.note}"
        )
    failed = [c.name for c in checks if not c.passed]
    print(
        f"{len(checks) - len(failed)}/{len(checks)} checks passed, float64, beta in "
        f"[{args.beta_min:g}, {args.beta_max:g}], {args.trials} problems per shape, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# retrieve: data


IMAGES_FORMAT = "an .npz holding images (N, H, W[, C]) with pixel values 0..255, e.g. train_images"


def load_image_patterns(path: Path, count: int, key: str | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """The first ``count`` images of an .npz (key ``key`` or the first ``*_images`` key) as rows;
    a file that holds fewer is a note on stderr. Unreadable files, and pixels that are not finite
    values in 0..255, are one-line errors."""
    try:
        with Npz(path, IMAGES_FORMAT) as data:
            keys = [k for k in data.files if k.endswith("_images")] if key is None else [key]
            if not keys:
                raise UserError(f"{path}: no *_images array (found: {', '.join(data.files) or 'nothing'}); "
                                f"pass --key or give {IMAGES_FORMAT}")
            images = data[keys[0]]
    except NpzError as err:
        raise UserError(str(err)) from None
    if images.ndim < 3 or len(images) == 0:
        raise UserError(f"{path}: {keys[0]} has shape {images.shape}, expected (N, H, W[, C]) images")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise UserError(f"{path}: {keys[0]} has dtype {images.dtype}, expected pixel values 0..255")
    images = images[:count].astype(np.float64)
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255:
        raise UserError(f"{path}: {keys[0]} holds values from {np.nanmin(images):g} to {np.nanmax(images):g}"
                        f"{' and NaN or infinities' if not np.all(np.isfinite(images)) else ''}; "
                        "expected pixel values 0..255")
    if len(images) < count:
        warn(f"note: {path} holds {len(images)} images in {keys[0]}, fewer than --patterns {count}; storing {len(images)}")
    return images.reshape(len(images), -1), images.shape[1:]


def normalise(patterns: np.ndarray) -> np.ndarray:
    """Each pattern to zero mean and unit RMS, so x.x = D for every stored pattern."""
    centred = patterns - patterns.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-12)


def corrupt(patterns: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Queries: the second half of every pattern masked to 0, then Gaussian noise of std ``noise``."""
    queries = patterns.copy()
    queries[:, patterns.shape[1] // 2 :] = 0.0
    return queries + noise * rng.standard_normal(queries.shape)


# ----------------------------------------------------------------------------------------------
# retrieve: experiments (batched over queries and betas with vmap)


def _retrieve_grid(Q, X, betas, max_steps):
    """CCCP for every beta (outer) and query (inner): q* (B, M, D), steps (B, M), energies (B, M, T)."""
    per_query = jax.vmap(lambda q, beta: cccp_retrieve(q, X, beta, max_steps, 1e-8), in_axes=(0, None))
    return jax.jit(jax.vmap(per_query, in_axes=(None, 0)))(Q, betas)


def retrieval_sweep(X, Q, betas, max_steps):
    """Fraction retrieved (nearest stored pattern is the target and relative error < 5%), mean
    relative error, mean steps, per beta; plus the raw fixed points and energies."""
    result = _retrieve_grid(jnp.asarray(Q), jnp.asarray(X), jnp.asarray(betas), max_steps)
    q_star = np.asarray(result.q)
    errors = np.linalg.norm(q_star - X[None], axis=-1) / np.linalg.norm(X, axis=-1)[None]
    nearest = np.argmax(q_star @ X.T, axis=-1)
    correct = (nearest == np.arange(len(X))[None]) & (errors < 0.05)
    return {
        "success": correct.mean(axis=1),
        "error": errors.mean(axis=1),
        "steps": np.asarray(result.steps).mean(axis=1),
        "q_star": q_star,
        "energies": np.asarray(result.energies),
    }


def capacity_curve(dim: int, counts: list[int], flip: float, beta: float, rng: np.random.Generator):
    """Fraction of +-1 patterns recovered exactly from ``flip``-corrupted copies, classic vs modern."""
    classic, modern = [], []
    for n in counts:
        X = np.where(rng.random((n, dim)) < 0.5, -1.0, 1.0)
        flips = rng.random((n, dim)) < flip
        Q = np.where(flips, -X, X)
        Xj, Qj = jnp.asarray(X), jnp.asarray(Q)
        W = classic_weights(Xj)
        q_classic = jax.vmap(lambda q: classic_retrieve(q, W).q)(Qj)
        q_modern = jax.vmap(lambda q: binary_sign(cccp_retrieve(q, Xj, beta, 50, 1e-8).q))(Qj)
        classic.append(float(np.mean(np.all(np.asarray(q_classic) == X, axis=1))))
        modern.append(float(np.mean(np.all(np.asarray(q_modern) == X, axis=1))))
    return classic, modern


# ----------------------------------------------------------------------------------------------
# retrieve: plots


def _as_image(vector: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    image = vector.reshape(shape)
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def plot_retrieval(out: Path, betas, sweep, X, Q, shape, picks: list[int]):
    plt = pyplot()

    fig, (ax_acc, ax_steps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_acc.semilogx(betas, sweep["success"], "o-", label="retrieved (nearest = target, error < 5%)")
    ax_acc.semilogx(betas, sweep["error"], "s--", label="mean ||q* - x|| / ||x||")
    ax_acc.set_xlabel("beta")
    ax_acc.set_title("Retrieval vs beta")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    ax_steps.semilogx(betas, sweep["steps"], "o-")
    ax_steps.set_xlabel("beta")
    ax_steps.set_ylabel("mean CCCP updates until ||q_t+1 - q_t|| < 1e-8")
    ax_steps.set_title("Large beta: q_1 is the pattern (q_2 confirms)")
    ax_steps.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "retrieval_vs_beta.png", dpi=110)
    plt.close(fig)

    if len(shape) < 2:
        return
    beta_cols = np.unique(np.linspace(0, len(betas) - 1, 5).round().astype(int))
    fig, axes = plt.subplots(len(picks), 2 + len(beta_cols), figsize=(2 * (2 + len(beta_cols)), 2.1 * len(picks)))
    axes = np.atleast_2d(axes)
    for row, m in enumerate(picks):
        panels = [("stored", X[m]), ("query", Q[m])] + [
            (f"beta={betas[b]:.2g}", sweep["q_star"][b, m]) for b in beta_cols
        ]
        for col, (title, vec) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(_as_image(vec, shape), cmap=None if len(shape) == 3 else "gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle("small beta: average of all patterns; middle: metastable mixtures; large: the stored pattern")
    fig.tight_layout()
    fig.savefig(out / "retrieval_examples.png", dpi=110)
    plt.close(fig)


def plot_energy(out: Path, betas, energies, query: int):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in np.unique(np.linspace(0, len(betas) - 1, 6).round().astype(int)):
        trace = energies[b, query]
        trace = trace[np.isfinite(trace)]
        ax.plot(np.arange(len(trace)), trace, "o-", ms=3, label=f"beta={betas[b]:.2g}")
    ax.set_xlabel("CCCP step t")
    ax.set_ylabel("E(q_t)")
    ax.set_yscale("symlog")
    ax.set_title("Energy along the CCCP trajectory (never increases)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "energy_trajectory.png", dpi=110)
    plt.close(fig)


def plot_capacity(out: Path, dim: int, counts, classic, modern, flip: float):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.array(counts) / dim, classic, "o-", label="classic: q <- sign(X^T X q)")
    ax.plot(np.array(counts) / dim, modern, "s-", label="modern: CCCP, then sign")
    ax.axvline(0.138, color="grey", ls=":", label="classic capacity 0.138 D")
    ax.set_xlabel(f"stored patterns N / D (D = {dim})")
    ax.set_ylabel("fraction recovered exactly")
    ax.set_title(f"Capacity, +-1 patterns, {flip:.0%} bits flipped")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=110)
    plt.close(fig)


def layer_path_gap(X: np.ndarray, Q: np.ndarray, beta: float, steps: int) -> float:
    """Largest |difference| between a static :class:`hopfield.Hopfield` layer (no projections, no
    LayerNorm, scaling beta, ``steps`` updates) and ``steps`` CCCP updates of the same queries,
    relative to max |X|: the layer path computes the pure functions' retrieval."""
    from flax import nnx

    from hopfield import Hopfield, cccp_step_batch

    layer = Hopfield(X.shape[1], static=True, normalize=False, scaling=beta, update_steps=steps, rngs=nnx.Rngs(0))
    ours = np.asarray(layer(jnp.asarray(Q)[None], jnp.asarray(X)[None])[0])
    q = jnp.asarray(Q)
    for _ in range(steps):
        q = cccp_step_batch(q, jnp.asarray(X), beta)
    return float(np.max(np.abs(ours - np.asarray(q))) / np.max(np.abs(X)))


def train_lookup(X: np.ndarray, noise: float, rng: np.random.Generator, steps: int, slots: int = 8):
    """Retrieval after training: a :class:`hopfield.HopfieldLayer` whose stored patterns and values
    (``slots`` per pattern, learned from N(0, 0.02^2), scaling 1, no projections) is trained with
    Adam to map fresh corruptions of ``X`` (as :func:`corrupt`) to ``X`` (mean squared error),
    then queried with new corruptions. -> (layer, queries, outputs, fraction retrieved (nearest
    pattern right and relative error < 5%), fraction identified (nearest pattern right), mean
    relative error)."""
    import optax
    from flax import nnx

    from hopfield import HopfieldLayer

    X32 = jnp.asarray(X, jnp.float32)
    layer = HopfieldLayer(X.shape[1], quantity=slots * len(X), static=True, normalize=False, scaling=1.0,
                          rngs=nnx.Rngs(int(rng.integers(2**31))))
    optimizer = nnx.Optimizer(layer, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer, queries):
        loss, grads = nnx.value_and_grad(lambda lookup: jnp.mean((lookup(queries[None])[0] - X32) ** 2))(layer)
        optimizer.update(layer, grads)
        return loss

    for _ in range(steps):
        step(layer, optimizer, jnp.asarray(corrupt(X, noise, rng), jnp.float32))
    queries = corrupt(X, noise, rng)
    outputs = np.asarray(layer(jnp.asarray(queries, jnp.float32)[None])[0], np.float64)
    errors = np.linalg.norm(outputs - X, axis=1) / np.linalg.norm(X, axis=1)
    identified = np.argmax(outputs @ X.T, axis=1) == np.arange(len(X))
    return layer, queries, outputs, float(np.mean(identified & (errors < 0.05))), float(np.mean(identified)), float(errors.mean())


def plot_lookup(out: Path, X, queries, outputs, shape, picks: list[int]) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(picks), 3, figsize=(6, 2 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        for col, (image, title) in enumerate(((queries[i], "new corruption"), (outputs[i], "trained layer"),
                                              (X[i], "original"))):
            axes[row, col].imshow(_as_image(image, shape), cmap=None if len(shape) == 3 else "gray")
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title, fontsize=9)
    fig.suptitle("retrieval after training: a HopfieldLayer's learned memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "lookup_examples.png", dpi=110)
    plt.close(fig)
    return out / "lookup_examples.png"


def cmd_retrieve(args) -> int:
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    if args.images is not None:
        raw, shape = load_image_patterns(args.images, args.patterns, args.key)
    else:
        side = math.isqrt(args.dim)
        shape = (side, side) if side * side == args.dim else (args.dim,)
        raw = rng.standard_normal((args.patterns, args.dim))
    X = normalise(raw)
    Q = corrupt(X, args.noise, rng)
    dim = X.shape[1]
    # Score gaps scale with D (x.x = D), so the sweep covers beta * D from 0.1 to 1e3.
    betas = np.logspace(-1, 3, args.betas) / dim
    sweep = retrieval_sweep(X, Q, betas, args.max_steps)

    args.out.mkdir(parents=True, exist_ok=True)
    counts = sorted({max(2, int(round(r * args.capacity_dim))) for r in np.linspace(0.05, 1.5, args.capacity_points)})
    classic, modern = capacity_curve(args.capacity_dim, counts, 0.1, 1.0, rng)
    plot_retrieval(args.out, betas, sweep, X, Q, shape, picks=list(range(min(4, len(X)))))
    plot_energy(args.out, betas, sweep["energies"], query=0)
    plot_capacity(args.out, args.capacity_dim, counts, classic, modern, 0.1)
    # the layer path: a static Hopfield layer at the first beta that retrieves every pattern (or the largest)
    b_layer = int(np.argmax(sweep["success"] == 1.0)) if np.any(sweep["success"] == 1.0) else len(betas) - 1
    gap = layer_path_gap(X, Q, float(betas[b_layer]), 2)
    lookup = None
    if args.lookup_steps:
        _, lookup_q, lookup_out, retrieved, identified, lookup_error = train_lookup(X, args.noise, rng, args.lookup_steps)
        plot_lookup(args.out, X, lookup_q, lookup_out, shape, picks=list(range(min(4, len(X)))))
        lookup = {"steps": args.lookup_steps, "slots": 8 * len(X), "retrieved": retrieved, "identified": identified,
                  "relative_error": lookup_error}

    print(f"{len(X)} patterns of dimension {dim}; queries: second half masked, noise std {args.noise}")
    print(f"{'beta':>10} {'retrieved':>10} {'rel.error':>10} {'steps':>7}")
    for b, beta in enumerate(betas):
        print(f"{beta:>10.3g} {sweep['success'][b]:>10.2f} {sweep['error'][b]:>10.3f} {sweep['steps'][b]:>7.1f}")
    print(f"capacity (D={args.capacity_dim}, 10% flips): N/D, classic, modern")
    for n, c, m in zip(counts, classic, modern):
        print(f"  {n / args.capacity_dim:5.2f}  {c:5.2f}  {m:5.2f}")
    print(f"layer path: a static Hopfield layer, 2 steps at beta {betas[b_layer]:.3g}, differs from 2 CCCP steps by "
          f"{gap:.1e} of max |x|")
    if lookup is not None:
        print(f"after training ({lookup['steps']} Adam steps, {lookup['slots']} learned slots): new corruptions "
              f"retrieved {lookup['retrieved']:.2f}, nearest pattern right {lookup['identified']:.2f}, "
              f"mean relative error {lookup['relative_error']:.3f}")
    summary = {
        "patterns": len(X),
        "dim": dim,
        "noise": args.noise,
        "betas": betas.tolist(),
        "retrieved": sweep["success"].tolist(),
        "relative_error": sweep["error"].tolist(),
        "mean_steps": sweep["steps"].tolist(),
        "capacity": {"dim": args.capacity_dim, "counts": counts, "classic": classic, "modern": modern},
        "layer_path": {"beta": float(betas[b_layer]), "steps": 2, "max_relative_gap": gap},
        "lookup_after_training": lookup,
        "wall_s": time.perf_counter() - start,
    }
    write_json(args.out / "retrieval.json", summary, indent=2)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.png')))} and retrieval.json to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m experiments.hopfield", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="randomised float64 checks of the analytic math")
    verify.add_argument("--trials", type=positive_int, default=64, help="problems per (N, D) shape (default: %(default)s)")
    verify.add_argument("--seed", type=seed, default=0, help="seed of the random problems (default: %(default)s)")
    verify.add_argument("--beta-min", type=positive_float, default=1e-2, help="smallest beta drawn (default: %(default)s)")
    verify.add_argument("--beta-max", type=positive_float, default=1e3, help="largest beta drawn (default: %(default)s)")
    retrieve = sub.add_parser("retrieve", help="store, corrupt, retrieve; write plots")
    retrieve.add_argument("--images", type=Path, help=".npz with images, pixel values 0..255 (default: random patterns)")
    retrieve.add_argument("--key", help="array in --images to use (default: the first *_images)")
    retrieve.add_argument("--patterns", type=positive_int, default=32, help="number of stored patterns (default: %(default)s)")
    retrieve.add_argument("--dim", type=positive_int, default=256, help="dimension of random patterns (default: %(default)s)")
    retrieve.add_argument("--noise", type=unit_interval, default=0.3,
                          help="std of the noise added to queries, in [0, 1] (patterns have unit RMS) (default: %(default)s)")
    retrieve.add_argument("--betas", type=positive_int, default=13, help="points in the beta sweep (default: %(default)s)")
    retrieve.add_argument("--max-steps", type=positive_int, default=50, help="CCCP updates at most (default: %(default)s)")
    retrieve.add_argument("--capacity-dim", type=positive_int, default=64, help="D of the capacity test (default: %(default)s)")
    retrieve.add_argument("--capacity-points", type=positive_int, default=12, help="N/D values, 0.05 to 1.5 (default: %(default)s)")
    retrieve.add_argument("--seed", type=seed, default=0, help="seed of patterns, masks and noise (default: %(default)s)")
    retrieve.add_argument("--lookup-steps", type=non_negative_int, default=1000,
                          help="Adam steps training the HopfieldLayer of the retrieval-after-training example; "
                               "0 skips it (default: %(default)s)")
    retrieve.add_argument("--out", type=folder, default=Path("runs/hopfield"), help="results folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "verify" and args.beta_min > args.beta_max:
        verify.error("--beta-min must not exceed --beta-max")
    jax.config.update("jax_enable_x64", True)  # the checks and the demo run in float64
    return cmd_verify(args) if args.command == "verify" else cmd_retrieve(args)


if __name__ == "__main__":
    run(main)
