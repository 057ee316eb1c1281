"""The CNN's three convolutions alone, ours (XLA, jitted) beside PyTorch's, at one batch size.

    python -m benchmarks.cnn_convs [--batch-size 64] [--rounds 5] [--xla-defaults]

For each conv layer (48x48 3->32, 24x24 32->64, 12x12 64->128; 3x3, padding 1) it times, best
of ``--rounds`` rounds of 10 calls: our forward, input gradient (``dx``) and kernel gradient
(``dk``) as separate jitted programs, and PyTorch's forward (no grad) and forward+backward
(``Conv2d`` with bias, NCHW, 2 threads). The first layer's ``dx`` is left out of our total, as a
training step never computes it (its input is the images). Set up as ``experiments.cnn``
(XLA:CPU flags and the allocator setting of ``common/xla_cpu.py`` for the batch size; ``--xla-defaults`` leaves
both alone). This separates the convolutions from the rest of a training step
(``benchmarks.cnn_profile``): docs/performance.md, "Where the targets stand".
"""

from __future__ import annotations

import argparse
import time

from common.xla_cpu import cnn_retains_memory, tune_cpu

LAYERS = ((48, 3, 32), (24, 32, 64), (12, 64, 128))  # (side, in channels, out channels)


def best_ms(fn, rounds: int, calls: int = 10) -> float:
    """Best over ``rounds`` of the mean time of ``calls`` calls of ``fn`` (which blocks), in ms."""
    fn()
    times = []
    for _ in range(rounds):
        tick = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - tick) / calls)
    return min(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--xla-defaults", action="store_true", help="XLA's own CPU flags and glibc's own allocator settings")
    args = parser.parse_args(argv)
    if not args.xla_defaults:
        tune_cpu()
        cnn_retains_memory(args.batch_size)

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(2)
    B, ours_total, torch_total = args.batch_size, 0.0, 0.0

    def conv(h, k):
        return jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    print(f"batch {B}; ms, best of {args.rounds} x 10 calls")
    print(f"{'layer':16s} {'fwd':>7s} {'dx':>7s} {'dk':>7s} {'GFLOP/s fwd':>12s} | {'torch fwd':>9s} {'fwd+bwd':>8s}")
    for index, (side, c_in, c_out) in enumerate(LAYERS):
        rng = np.random.default_rng(index)
        x = jax.numpy.asarray(rng.standard_normal((B, side, side, c_in)), jax.numpy.float32)
        k = jax.numpy.asarray(rng.standard_normal((3, 3, c_in, c_out)), jax.numpy.float32)
        g = jax.numpy.asarray(rng.standard_normal((B, side, side, c_out)), jax.numpy.float32)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, k: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
        dk = jax.jit(lambda x, k: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
        ours = {name: best_ms(lambda f=f: f(x, k).block_until_ready(), args.rounds) for name, f in
                (("fwd", fwd), ("dx", dx), ("dk", dk))}
        ours_total += ours["fwd"] + ours["dk"] + (ours["dx"] if index else 0.0)

        layer = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        xt = torch.randn(B, c_in, side, side, requires_grad=index > 0)
        gt = torch.randn(B, c_out, side, side)

        def torch_fwd():
            with torch.no_grad():
                layer(xt)

        def torch_step():
            layer(xt).backward(gt)

        theirs = {"fwd": best_ms(torch_fwd, args.rounds), "step": best_ms(torch_step, args.rounds)}
        torch_total += theirs["step"]
        gflops = 2 * B * side * side * 9 * c_in * c_out / (ours["fwd"] * 1e-3) / 1e9
        print(f"{side}x{side} {c_in:>3d}->{c_out:<4d} {ours['fwd']:7.2f} {ours['dx']:7.2f} {ours['dk']:7.2f} "
              f"{gflops:12.0f} | {theirs['fwd']:9.2f} {theirs['step']:8.2f}")
    print(f"training-step convolutions: ours {ours_total:.1f} ms (fwd + dk, + dx past the first layer), "
          f"torch {torch_total:.1f} ms (forward + backward)")


if __name__ == "__main__":
    main()
