"""Training epoch time by steps per dispatch (K): what each part's default K is chosen from.

    python -m benchmarks.steps_per_call [--part cnn p2g] [--impl reference xla_cpu] [--k 1 4 16 0]
                                        [--steps 200] [--epochs 2]

The real trainers and steps (CNN baseline at batch 8; P2G at its defaults, on synthetic words
of the WikiPron lengths' spread) on synthetic data of ``--steps`` batches an epoch; K = 0 is the
whole epoch. Each (part, implementation) runs in this process with the XLA:CPU settings of
``experiments.cnn``; reports the median over ``--epochs`` epochs after a warm-up one, in
milliseconds per step, and as its last line one JSON object {part: {impl: {K: ms}}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common.xla_cpu import tune_cpu


def cnn_epoch(impl: str, steps: int):
    import numpy as np

    from cnn.train import Trainer

    n = 8 * steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, n).astype(np.int32)
    trainer = Trainer(False, 0.01, 8, impl=impl)
    return trainer, lambda state, epoch: trainer.train_epoch(state, images, labels, epoch)


def p2g_epoch(impl: str, steps: int):
    import numpy as np

    from p2g.data import PAD, Batchable
    from p2g.train import Trainer

    n, S, T = 64 * steps, 40, 56
    rng = np.random.default_rng(0)
    src_len = np.clip(rng.gamma(6.0, 1.2, n).astype(int), 1, S)  # mostly 3..12, a few long words
    tgt_len = np.clip(src_len + rng.integers(0, 3, n), 2, T)
    src = np.where(np.arange(S) < src_len[:, None], rng.integers(4, 40, (n, S)), PAD).astype(np.int32)
    tgt = np.where(np.arange(T) < tgt_len[:, None], rng.integers(4, 30, (n, T)), PAD).astype(np.int32)
    data = Batchable(src, src_len.astype(np.int32), tgt, tgt, [""] * n)
    trainer = Trainer(40, 30, impl=impl)
    return trainer, lambda state, epoch: trainer.train_epoch(state, data, epoch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steps_per_call", description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", choices=("cnn", "p2g"), default=["cnn", "p2g"])
    parser.add_argument("--impl", nargs="+", choices=("reference", "xla_cpu"), default=["reference", "xla_cpu"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 4, 16, 0], help="steps per dispatch (0: the epoch)")
    parser.add_argument("--steps", type=int, default=200, help="steps an epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (median reported)")
    args = parser.parse_args(argv)
    tune_cpu()
    result = {}
    for part in args.part:
        for impl in args.impl:
            trainer, epoch_of = (cnn_epoch if part == "cnn" else p2g_epoch)(impl, args.steps)
            state = trainer.init_state()
            for K in args.k:
                trainer.steps_per_call = K or args.steps
                state, _ = epoch_of(state, 0)
                times = []
                for epoch in range(1, args.epochs + 1):
                    tick = time.perf_counter()
                    state, _ = epoch_of(state, epoch)
                    times.append(time.perf_counter() - tick)
                ms = 1e3 * statistics.median(times) / args.steps
                result.setdefault(part, {}).setdefault(impl, {})[str(K or "epoch")] = round(ms, 3)
                print(f"{part} {impl} K={K or 'epoch'}: {ms:.2f} ms/step", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
