"""Where a CNN training step's time goes on this machine: step time, page faults, and XLA's ops.

    python -m benchmarks.cnn_profile [--batch-norm] [--batch-size 64] [--steps 20] [--top 15]
                                     [--xla-defaults] [--keep-allocator]

Runs the real :class:`cnn.train.Trainer` step on synthetic data, set up as ``experiments.cnn``
sets itself up (XLA:CPU flags and, from batch 32, :func:`common.xla_cpu.retain_freed_memory`; ``--xla-defaults``
leaves both alone, ``--keep-allocator`` only the allocator). Prints the median step time, the
minor page faults per step, then the XLA thunks (fusions, library calls) that took the most time
in a ``jax.profiler`` trace of 5 steps, summed over the threads that ran them. This is how the
reduce-window sums and the page faults of docs/performance.md were found.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

from common.xla_cpu import cnn_retains_memory, tune_cpu


def thunk_times(trace_dir: str, steps: int) -> collections.Counter:
    """ms per step of each XLA thunk in a perfetto trace (numbered clones of one op summed apart)."""
    (trace,) = Path(trace_dir).rglob("perfetto_trace.json.gz")
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and not re.match(r"\$|ThunkExecutor|Pjit|end: ", name):
            totals[name] += event["dur"] / 1e3 / steps
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--top", type=int, default=15, help="thunks listed")
    parser.add_argument("--xla-defaults", action="store_true", help="XLA's own CPU flags and glibc's own allocator settings")
    parser.add_argument("--keep-allocator", action="store_true", help="glibc's own allocator settings")
    args = parser.parse_args(argv)
    if not args.xla_defaults:
        tune_cpu()
        if not args.keep_allocator:
            cnn_retains_memory(args.batch_size)

    import jax
    import numpy as np

    from cnn.train import Trainer

    B = args.batch_size
    trainer = Trainer(args.batch_norm, 0.01, B, impl="xla_cpu")
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    n = 16 * B
    images = trainer.put(rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8))
    labels = trainer.put(rng.integers(0, 6, n).astype(np.int32))
    key = trainer.epoch_key(0)
    batches = [jax.device_put(np.arange(i * B, (i + 1) * B, dtype=np.int32) % n) for i in range(16)]

    def step(i):
        nonlocal state
        state, loss = trainer._train_step(state, images, labels, batches[i % 16], key)
        return loss

    for i in range(3):  # compile, warm up
        jax.block_until_ready(step(i))
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(args.steps):
        tick = time.perf_counter()
        jax.block_until_ready(step(i))
        times.append(time.perf_counter() - tick)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.steps
    per_step = statistics.median(times)
    print(f"{'BN' if args.batch_norm else 'baseline'} CNN, batch {B}: {per_step * 1e3:.1f} ms/step "
          f"({B / per_step:.0f} images/s), {faults:.0f} minor page faults/step")

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for i in range(5):
            loss = step(i)
        jax.block_until_ready(loss)
        jax.profiler.stop_trace()
        totals = thunk_times(trace_dir, 5)
    print(f"XLA thunks, ms per step summed over threads (all: {sum(totals.values()):.1f}):")
    for name, ms in totals.most_common(args.top):
        print(f"  {ms:7.2f}  {name}")


if __name__ == "__main__":
    main()
