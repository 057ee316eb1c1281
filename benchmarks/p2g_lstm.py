"""One P2G training shard's gradient with the LSTM layer as shipped (``p2g.lstm.lstm_layer``, its
gradient written out, on words packed end to end) against the same model with autodiff through the
cell stepped in a scan over the padded words.

    python -m benchmarks.p2g_lstm [--batch-size 32] [--src-len 16] [--tgt-len 16] [--attn] [--rounds 7]

Times ``jax.value_and_grad`` of :meth:`p2g.train.Trainer._loss` (what each device computes for its
half of a batch of 64; dropout on) on synthetic words, jitted, best of ``--rounds`` x 20 calls,
the two versions alternating, and prints how far apart their float32 gradients are. Run it
under ``taskset -c 0`` to see one device's share of a two-core machine (docs/performance.md,
item 10).
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

    from p2g import model
    from p2g.data import pack_words
    from p2g.lstm import stepped_cell_scan
    from p2g.train import Trainer

    B, S, T = args.batch_size, args.src_len, args.tgt_len
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(S // 2, S + 1, B).astype(np.int32), rng.integers(T // 2, T + 1, B).astype(np.int32)
    src = np.where(np.arange(S)[None] < src_len[:, None], rng.integers(4, 40, (B, S)), 0).astype(np.int32)
    tgt_in, tgt_out = (np.where(np.arange(T)[None] < tgt_len[:, None], rng.integers(4, 30, (B, T)), 0).astype(np.int32)
                       for _ in range(2))
    (s, s0), (ti, t0), (to, _) = (pack_words(a, n) for a, n in ((src, src_len), (tgt_in, tgt_len), (tgt_out, tgt_len)))
    batch = (model.Words(s, s0, src_len), model.Words(ti, t0, tgt_len), to)
    trainer = Trainer(45, 32, attention=args.attn)
    params, key = trainer.init_state().params, jax.random.key(0)

    def stepped(cell, inputs, words, carry, reverse=False):
        """The packed layer's definition: the cell stepped over the words laid out padded."""
        width = max(S, T)
        t = jnp.arange(width)[None, :]
        flip = jnp.where(t < words.lengths[:, None], words.lengths[:, None] - 1 - t, t) if reverse else t
        flip = jnp.broadcast_to(flip, (B, width))[..., None]
        x = jnp.take_along_axis(model.to_padded(inputs, words, width), flip, axis=1)
        carry, out = stepped_cell_scan(cell, x, words.lengths, carry)
        return carry, model.from_padded(jnp.take_along_axis(out, flip, axis=1), words)

    shipped = model.masked_lstm
    versions = {}
    for name, layer in (("written-out gradient", shipped), ("autodiff of the stepped cell", stepped)):
        model.masked_lstm = layer  # looked up when the model is traced, i.e. in the first call
        grad = jax.jit(lambda p, k: jax.value_and_grad(trainer._loss)(p, *batch, k, float(B * T), (S, T) if args.attn else None))
        versions[name] = (grad, jax.block_until_ready(grad(params, key)))
    model.masked_lstm = shipped

    best = {name: float("inf") for name in versions}
    for _ in range(args.rounds):
        for name, (grad, _) in versions.items():
            tick = time.perf_counter()
            for _ in range(20):
                out = grad(params, key)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - tick) / 20)

    print(f"gradient of one shard: batch {B}, {S} phonemes, {T} letters, attention {'on' if args.attn else 'off'}; "
          f"best of {args.rounds} x 20 calls")
    for name, seconds in best.items():
        print(f"  {name:30s} {seconds * 1e3:7.2f} ms")
    (_, (loss_a, grads_a)), (_, (loss_b, grads_b)) = versions.values()
    worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)))
    print(f"  loss {float(loss_a):.6f} vs {float(loss_b):.6f}; gradients differ by at most {worst:.1e} of a leaf's largest entry")


if __name__ == "__main__":
    main()
