"""P2G epoch time and CNN step time of this tree against an earlier commit, side by side.

    python -m benchmarks.before_after --before d08fa81 [--rounds 3] [--quick]

The earlier commit is checked out into a temporary git worktree; each measurement runs in a fresh
process of its tree (XLA:CPU settings last as long as a process), one process at a time, each set
up as that tree's command-line tool sets itself up (``--impl auto``: the xla_cpu kernels and
XLA:CPU flags on a CPU). P2G: one training epoch over the shared homework split (the best of
``--rounds`` epochs after a compiling one), with and without attention, in each tree's default
device layout and, for this tree, on two host devices and without length buckets. CNN: the median
jitted training step (batch 8 and 64, baseline and BN): the mean over a 23-step epoch after a compiling one.
Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside a tree (cwd and PYTHONPATH); argv: what [options as JSON]. Prints one JSON line.
PROBE = r"""
import json, os, sys, time
what, options = sys.argv[1], json.loads(sys.argv[2])
if what == "p2g":
    import jax
    devices = options.get("devices")
    try:
        from experiments._xla import request_cpu_devices, data_parallel_devices   # the earlier tree
        request_cpu_devices(devices)
        old = True
    except ImportError:
        old = False
        if devices:
            jax.config.update("jax_num_cpu_devices", devices)
    import numpy as np
    from p2g.data import Vocab, encode_pairs, read_tsv
    from p2g.train import Trainer
    pairs = read_tsv(options["train"])
    if options.get("quick"):
        pairs = pairs[:1024]
    src, tgt = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
    data = encode_pairs(pairs, src, tgt)
    kwargs = dict(attention=options["attention"], impl="xla_cpu")
    if old:
        kwargs["devices"] = data_parallel_devices(devices)
    else:
        kwargs["devices"] = jax.devices()[: devices or 1]
        kwargs["bucket"] = options.get("bucket", 16)
    trainer = Trainer(len(src), len(tgt), **kwargs)
    state, times = trainer.init_state(), []
    for epoch in range(1 + options["rounds"]):
        tick = time.perf_counter()
        state, loss = trainer.train_epoch(state, data, epoch)
        times.append(time.perf_counter() - tick)
    print(json.dumps({"seconds": min(times[1:]), "first": times[0], "words": len(data)}))
else:  # cnn
    from common.xla_cpu import cnn_retains_memory, tune_cpu
    tune_cpu()
    cnn_retains_memory(options["batch"])
    import jax
    import numpy as np
    from cnn.train import Trainer
    B = options["batch"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23 * B, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, 23 * B).astype(np.int32)
    trainer = Trainer(options["batch_norm"], 0.01, B, impl="xla_cpu")
    state, x, y = trainer.init_state(), trainer.put(images), trainer.put(labels)
    for epoch in range(2):  # the first compiles; the second is timed (the loss fetched at its end waits for every step)
        start = time.perf_counter()
        state, _ = trainer.train_epoch(state, x, y, epoch)
        total = time.perf_counter() - start
    print(json.dumps({"seconds": total / 23}))
"""


def probe(tree: Path, what: str, **options) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, what, json.dumps(options)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit (e.g. d08fa81)")
    parser.add_argument("--rounds", type=int, default=3, help="timed P2G epochs after the compiling one (default: 3)")
    parser.add_argument("--quick", action="store_true", help="1,024 words, one timed epoch (a smoke test)")
    parser.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "p2g" / "train.tsv"))
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows = []
            for attention in (False, True):
                name = "attention" if attention else "no attention"
                common = dict(train=args.train, attention=attention, rounds=rounds, quick=args.quick)
                rows.append((f"P2G epoch, {name}: before (hand-rolled split over 2 host devices)",
                             probe(before, "p2g", **common)))
                rows.append((f"P2G epoch, {name}: after, 1 device, length buckets", probe(ROOT, "p2g", **common)))
                rows.append((f"P2G epoch, {name}: after, 1 device, no buckets", probe(ROOT, "p2g", bucket=1, **common)))
                rows.append((f"P2G epoch, {name}: after, 2 host devices, length buckets",
                             probe(ROOT, "p2g", devices=2, **common)))
            for batch_norm in (False, True):
                for batch in (8, 64):
                    label = f"CNN step, {'BN' if batch_norm else 'baseline'}, batch {batch}"
                    for tree, when in ((before, "before"), (ROOT, "after")):
                        rows.append((f"{label}: {when}", probe(tree, "cnn", batch=batch, batch_norm=batch_norm)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    print(f"{os.cpu_count()} CPU(s); before = {args.before}, after = this tree; best of {rounds} epoch(s) (P2G)")
    for label, result in rows:
        figure = f"{result['seconds'] * (1 if label.startswith('P2G') else 1e3):8.2f} {'s' if label.startswith('P2G') else 'ms'}" \
            if "seconds" in result else f"   error: {result['error']}"
        print(f"  {label:<72} {figure}")


if __name__ == "__main__":
    main()
