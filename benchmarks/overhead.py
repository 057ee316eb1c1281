"""The host's time per training step: what the step loop costs around a step that costs nothing.

    python -m benchmarks.overhead [--quick] [--epochs 3]

For each part (the CNN baseline at batch 8, P2G at its defaults, ``--impl auto``'s implementation
and the CLIs' XLA settings) the real trainer runs epochs of a no-op step of the same signature
(``(state, batch, epoch) -> (state with step + 1, 0.0)``: no device work to speak of), so the
epoch's wall time per step is the host's time per step: drawing the epoch's indices, placing
them, dispatching the jitted calls. Reported, in microseconds per step, the median over
``--epochs`` epochs after a warm-up one (compilation):

    k1_us        one step a dispatch (K = 1)
    default_us   the trainer's default K on this machine (default_k)
    epoch_us     the whole epoch in one dispatch (the default on an accelerator)
    host_path_us the loop before the data moved to the devices (each batch gathered with NumPy
                 on the host and transferred, one jitted step a dispatch), for comparison

Synthetic data of the real sizes (the Intel training split, 14,034 images; 10,000 P2G words);
``--quick``: small data sets, a smoke test whose figures mean little (the fixed costs of an
epoch, placing its indices and averaging its losses, weigh on its few steps). The last
line is one JSON object ``{"cnn": {...}, "p2g": {...}}`` of those keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common.xla_cpu import cnn_retains_memory, tune_cpu


def noop_step(state, batch, epoch):
    """A training step's signature, nothing of its work: the host's cost of a step alone (jitted
    with the state donated, so that its arrays pass through uncopied)."""
    import jax.numpy as jnp

    return state._replace(step=state.step + 1), jnp.float32(0)


def seconds_per_epoch(train_epoch, epochs: int) -> float:
    """The median wall time of ``epochs`` calls of ``train_epoch(epoch)`` after a warm-up call;
    each call ends on a host value, so the device work is inside it."""
    train_epoch(0)
    times = []
    for epoch in range(1, epochs + 1):
        tick = time.perf_counter()
        train_epoch(epoch)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def host_path_epoch(step, state, batches, sharding, epoch: int):
    """The loop as it was before the data moved to the devices: each host batch (a dict of NumPy
    arrays) placed with :func:`common.parallel.global_batch`, one jitted step a dispatch."""
    import jax.numpy as jnp
    import numpy as np

    from common.parallel import global_batch, put_replicated, to_host

    epoch_ = put_replicated(sharding.mesh, np.int32(epoch))
    losses = []
    for batch in batches:
        state, loss = step(state, global_batch(sharding, batch), epoch_)
        losses.append(loss)
    return state, to_host(jnp.mean(jnp.stack(losses), axis=0))


def measure(trainer, gather, run_epoch, host_batches, steps: int, epochs: int, cpu_default: int) -> dict:
    """The four figures of the module docstring for ``trainer`` (whose ``run_epoch(block, state,
    epoch)`` runs an epoch of ``block``; ``gather``: its part's batch gather; ``host_batches(epoch)``:
    the epoch's host batches; ``cpu_default``: its part's K on a CPU)."""
    import jax

    from common.training import block_step, jit_block, steps_per_call

    block = jit_block(block_step(noop_step, gather, trainer.batch_sharding), trainer.replicated, (0,))
    state = [trainer.init_state()]

    def epoch_of(K):
        def run(epoch):
            trainer.steps_per_call = K
            state[0], loss = run_epoch(block, state[0], epoch)
            float(loss)
        return run

    step = jax.jit(noop_step, out_shardings=trainer.replicated, donate_argnums=0)

    def host_path(epoch):
        state[0], loss = host_path_epoch(step, state[0], host_batches(epoch), trainer.batch_sharding, epoch)
        float(loss)

    platform = trainer.mesh.devices.flat[0].platform
    default_k = steps_per_call(None, steps, platform, cpu_default)
    us = lambda run: 1e6 * seconds_per_epoch(run, epochs) / steps  # noqa: E731
    return {"k1_us": us(epoch_of(1)), "default_us": us(epoch_of(None)), "default_k": default_k,
            "epoch_us": us(epoch_of(steps)), "host_path_us": us(host_path)}


def cnn(quick: bool, epochs: int) -> dict:
    import numpy as np

    from cnn.train import CPU_STEPS_PER_CALL, Trainer, gather

    n, batch = (400 if quick else 14_034), 8
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, n).astype(np.int32)
    trainer = Trainer(False, 0.01, batch, impl="xla_cpu" if _cpu() else "reference")

    def host_batches(epoch):
        return ({"images": images[index], "labels": labels[index]} for index in trainer.epoch_batches(n, epoch))

    run_epoch = lambda block, state, epoch: trainer.run_epoch(block, state, images, labels, epoch)  # noqa: E731
    return measure(trainer, gather, run_epoch, host_batches, -(-n // batch), epochs, CPU_STEPS_PER_CALL)


def p2g(quick: bool, epochs: int) -> dict:
    import numpy as np

    from p2g.data import PAD, Batchable
    from p2g.train import CPU_STEPS_PER_CALL, Trainer, batch_widths, gather

    n, batch, S, T = (640 if quick else 10_000), 64, 40, 56
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(2, 16, n), rng.integers(3, 17, n)
    src = np.where(np.arange(S) < src_len[:, None], rng.integers(4, 40, (n, S)), PAD).astype(np.int32)
    tgt_in = np.where(np.arange(T) < tgt_len[:, None], rng.integers(4, 30, (n, T)), PAD).astype(np.int32)
    data = Batchable(src, src_len.astype(np.int32), tgt_in, tgt_in, [""] * n)
    trainer = Trainer(40, 30, impl="xla_cpu" if _cpu() else "reference")

    def host_batches(epoch):
        for index in trainer.epoch_batches(data, epoch):
            s, t = batch_widths(data, index)
            yield {"src": data.src[index, :s], "src_len": data.src_len[index], "tgt_in": data.tgt_in[index, :t],
                   "tgt_out": data.tgt_out[index, :t]}

    run_epoch = lambda block, state, epoch: trainer.run_epoch(block, state, data, epoch)  # noqa: E731
    return measure(trainer, gather, run_epoch, host_batches, -(-n // batch), epochs, CPU_STEPS_PER_CALL)


def _cpu() -> bool:
    import jax

    return jax.devices()[0].platform == "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data: a smoke test")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (the median is reported)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    tune_cpu()  # as experiments.cnn sets itself up for its xla_cpu implementation
    cnn_retains_memory(8)
    import jax

    epochs = args.epochs
    print(f"host time per training step, microseconds (no-op step; {jax.devices()[0].device_kind}, jax {jax.__version__})"
          + ("; --quick: figures mean little" if args.quick else ""), flush=True)
    result = {}
    for name, part in (("cnn", cnn), ("p2g", p2g)):
        figures = part(args.quick, epochs)
        result[name] = {k: (v if k == "default_k" else round(v, 2)) for k, v in figures.items()}
        print(f"{name}: K=1 {figures['k1_us']:.1f}, default K={figures['default_k']} {figures['default_us']:.1f}, "
              f"whole epoch {figures['epoch_us']:.1f}, host path (one host batch a step) {figures['host_path_us']:.1f}",
              flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
