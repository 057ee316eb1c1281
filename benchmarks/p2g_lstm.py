"""One P2G training batch's gradient under both implementations: ``xla_cpu`` (the LSTM gradient of
``p2g.xla_cpu.lstm``, hashed dropout) against ``reference`` (``nnx.RNN`` scans, ``nnx.Dropout``,
autodiff).

    python -m benchmarks.p2g_lstm [--batch-size 32] [--src-len 16] [--tgt-len 16] [--attn] [--rounds 7]

Times ``jax.value_and_grad`` of :meth:`p2g.train.Trainer._loss` (dropout on) on synthetic words,
jitted, best of ``--rounds`` x 20 calls, the two alternating, then prints how far apart their
float32 gradients are with dropout off (the two draw different dropout masks).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=16)
    parser.add_argument("--tgt-len", type=int, default=16)
    parser.add_argument("--attn", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from p2g.train import Trainer

    B, S, T = args.batch_size, args.src_len, args.tgt_len
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(S // 2, S + 1, B).astype(np.int32), rng.integers(T // 2, T + 1, B).astype(np.int32)
    src = np.where(np.arange(S)[None] < src_len[:, None], rng.integers(4, 40, (B, S)), 0).astype(np.int32)
    tgt_in, tgt_out = (np.where(np.arange(T)[None] < tgt_len[:, None], rng.integers(4, 30, (B, T)), 0).astype(np.int32)
                       for _ in range(2))
    batch = {"src": jnp.asarray(src), "src_len": jnp.asarray(src_len), "tgt_in": jnp.asarray(tgt_in),
             "tgt_out": jnp.asarray(tgt_out)}
    key = jax.random.key(0)

    def gradient(impl, dropout):
        trainer = Trainer(45, 32, attention=args.attn, dropout=dropout, impl=impl)
        grad = jax.jit(lambda p, k: jax.value_and_grad(lambda q: trainer._loss(q, {}, batch, k)[0])(p))
        params = trainer.init_state().params
        jax.block_until_ready(grad(params, key))
        return grad, params

    versions = {impl: gradient(impl, 0.3) for impl in ("xla_cpu", "reference")}
    best = {name: float("inf") for name in versions}
    for _ in range(args.rounds):
        for name, (grad, params) in versions.items():
            tick = time.perf_counter()
            for _ in range(20):
                out = grad(params, key)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - tick) / 20)

    print(f"gradient of one batch: {B} words, {S} phonemes, {T} letters, attention {'on' if args.attn else 'off'}; "
          f"best of {args.rounds} x 20 calls")
    for name, seconds in best.items():
        print(f"  {name:10s} {seconds * 1e3:7.2f} ms")
    (loss_a, grads_a), (loss_b, grads_b) = (grad(params, key) for grad, params in
                                            (gradient(impl, 0.0) for impl in ("xla_cpu", "reference")))
    worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)))
    print(f"  dropout off: loss {float(loss_a):.6f} vs {float(loss_b):.6f}; gradients differ by at most {worst:.1e} "
          "of a leaf's largest entry")


if __name__ == "__main__":
    main()
