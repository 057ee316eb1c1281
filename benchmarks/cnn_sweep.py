"""The learning-rate sweep as one vmapped program (``--vmap-sweep``) against one run per lr.

    python -m benchmarks.cnn_sweep [--batch-norm] [--batch-size 8] [--lr 0.1 0.01 0.001] [--steps 64]

Both train every lr for ``--steps`` SGD steps on the same synthetic batches, through the real
trainers (:class:`cnn.train.SweepTrainer`, :class:`cnn.train.Trainer`); the median of
``--repeats`` timed calls after a warm-up is reported as model-images per second (images x lrs).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common.xla_cpu import tune_cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tune_cpu()
    import jax
    import numpy as np

    from cnn.train import SweepTrainer, Trainer

    n = args.steps * args.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, n).astype(np.int32)

    sweep = SweepTrainer([Trainer(args.batch_norm, lr, args.batch_size, impl="xla_cpu") for lr in args.lr])
    x, y = sweep.members[0].put(images), sweep.members[0].put(labels)
    state = [sweep.stack([m.init_state() for m in sweep.members])]

    def vmapped():
        state[0], losses = sweep.train_epoch(state[0], x, y, 0)

    trainers = [Trainer(args.batch_norm, lr, args.batch_size, impl="xla_cpu") for lr in args.lr]
    states = [t.init_state() for t in trainers]

    def sequential():
        for i, t in enumerate(trainers):
            states[i], _ = t.train_epoch(states[i], x, y, 0)

    print(f"{jax.devices()[0].device_kind} x{jax.local_device_count()}; {'BN' if args.batch_norm else 'baseline'} CNN, "
          f"batch {args.batch_size}, lrs {args.lr}, {args.steps} steps each")
    for name, fn in (("one run per lr", sequential), ("vmapped sweep", vmapped)):
        tick = time.perf_counter()
        fn()
        first = time.perf_counter() - tick
        times = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tick)
        rate = n * len(args.lr) / statistics.median(times)
        print(f"{name:<16} {rate:8.0f} model-images/s  (first call {first:.1f} s)")


if __name__ == "__main__":
    main()
