"""CNN training-step throughput on this machine: one jitted call per step vs steps inside lax.scan.

    python -m benchmarks.cnn_step [--batch-size 8] [--batch-norm] [--steps 20] [--impl xla_cpu]

Prints images/s for: a jitted train step called from Python; K steps in one jitted ``lax.scan``;
the same scan fully unrolled; the forward pass alone. Synthetic data, SGD, the same loss as
:mod:`cnn.train`. Compile time is reported apart (first call).
"""

from __future__ import annotations

import argparse
import time

from common.xla_cpu import tune_cpu

tune_cpu()  # the settings experiments.cnn runs with (HW2_XLA_DEFAULTS=1: XLA's own), before jax computes

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from cnn.model import CNN  # noqa: E402
from cnn.train import nll_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed call of the scanned variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", choices=("reference", "xla_cpu"), default="xla_cpu", help="CNN implementation (default: %(default)s)")
    args = parser.parse_args()
    B, K = args.batch_size, args.steps
    model = CNN(args.batch_norm, nnx.Rngs(0), impl=args.impl)
    model.train()
    graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.sgd(0.01)
    opt = tx.init(params)
    x = jnp.asarray(np.random.default_rng(0).random((B, 48, 48, 3), np.float32))
    y = jnp.zeros(B, jnp.int32)

    def loss(p, s, key):
        m = nnx.merge(graph, p, s, copy=True)
        return nll_loss(m(x, rngs=nnx.Rngs(dropout=key)), y), nnx.state(m, nnx.BatchStat)

    def update(carry, i):
        p, s, o = carry
        (value, s), g = jax.value_and_grad(loss, has_aux=True)(p, s, jax.random.fold_in(jax.random.key(0), i))
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), s, o), value

    step = jax.jit(update)
    scan = jax.jit(lambda c: jax.lax.scan(update, c, jnp.arange(K)))
    unrolled = jax.jit(lambda c: jax.lax.scan(update, c, jnp.arange(K), unroll=K))
    forward = jax.jit(lambda p, s: nnx.merge(graph, p, s, copy=True)(x, rngs=nnx.Rngs(dropout=0)))

    def per_step_calls(carry):
        for i in range(K):
            carry, value = step(carry, i)
        return carry, value

    def forward_calls(carry):
        for _ in range(K):
            out = forward(carry[0], carry[1])
        return carry, out

    print(f"device: {jax.devices()[0].device_kind}, {jax.local_device_count()} device(s); "
          f"{'BN' if args.batch_norm else 'baseline'} CNN, batch {B}, {K} steps per timed call")
    carry = (params, stats, opt)
    for name, fn in (("jit per step", per_step_calls), ("lax.scan", scan), ("lax.scan unrolled", unrolled),
                     ("forward only", forward_calls)):
        tick = time.perf_counter()
        jax.block_until_ready(fn(carry))
        compile_s = time.perf_counter() - tick
        times = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            jax.block_until_ready(fn(carry))
            times.append(time.perf_counter() - tick)
        per_step = float(np.median(times)) / K
        print(f"{name:<18} {B / per_step:8.0f} images/s  {per_step * 1e3:7.1f} ms/step  (first call {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
