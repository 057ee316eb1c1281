"""Minimal reproduction of the XLA:CPU in-process all-reduce deadlock, and the setting that avoids it.

    python -m benchmarks.cpu_allreduce            # steps dispatched asynchronously: aborts
    python -m benchmarks.cpu_allreduce --sync     # the host waits for each step: completes

Two XLA:CPU host devices in one process run a data-parallel step (the gradient of a replicated
matrix over a batch sharded in two, summed by XLA's all-reduce). With asynchronous dispatch the
host queues many steps ahead; the two devices' launches of consecutive steps then run on the
client's thread pool and one device enters a step's all-reduce rendezvous while the other's launch
of that step waits behind it: XLA logs "Expected 2 threads to join the rendezvous, but only 1 of
them arrived" and aborts the process after XLA's rendezvous timeout (about a minute on the machine
we measured; jaxlib 0.10.2, on one core or two). With at most one such step in flight (the host
blocks on each step's output) the rendezvous always completes; the trainers do that wherever one
process holds several CPU devices (:func:`common.parallel.in_process_collectives`). Processes with
one device each (gloo) are not affected.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sync", action="store_true", help="block on each step's output before the next")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    w = jax.device_put(jnp.ones((args.size, args.size)), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.ones((64, args.size)), NamedSharding(mesh, P("data")))

    @jax.jit
    def step(w, x):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)  # all-reduced across the two devices
        return w - 1e-6 * g

    tick = time.perf_counter()
    for i in range(args.steps):
        w = step(w, x)
        if args.sync:
            w.block_until_ready()
        if i % 500 == 0:
            print(f"step {i}: {time.perf_counter() - tick:.1f} s", flush=True)
    w.block_until_ready()
    print(f"{args.steps} steps {'with' if args.sync else 'without'} --sync completed in {time.perf_counter() - tick:.1f} s")


if __name__ == "__main__":
    main()
