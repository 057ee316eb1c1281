"""Where a P2G training epoch's time goes on a CPU, by device layout of the standard data-parallel path.

    python -m benchmarks.p2g_layouts [--rounds 3] [--attention] [--quick]

One epoch of ``p2g.train.Trainer`` (xla_cpu impl, length buckets) over the shared homework split,
the best of ``--rounds`` after a compiling one, each layout in fresh processes:

- one device on every core, the default (the host queues steps ahead);
- one device pinned to one core (``os.sched_setaffinity``): whether XLA:CPU spreads the model's
  small LSTM products over the cores at all;
- one device, the host waiting for each step: the cost of giving up asynchronous dispatch;
- two XLA:CPU host devices in one process (which must wait for each step, see
  ``benchmarks.cpu_allreduce``);
- two processes of one device each, joined by ``jax.distributed`` on 127.0.0.1 with gloo
  collectives: the multi-process path on one machine.

Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# argv: options as JSON. Prints one JSON line (process 0 of a multi-process run only).
PROBE = r"""
import json, os, sys, time
options = json.loads(sys.argv[1])
if options.get("cores") is not None:
    os.sched_setaffinity(0, options["cores"])
import jax
if options.get("devices"):
    jax.config.update("jax_num_cpu_devices", options["devices"])
from common.xla_cpu import tune_cpu
tune_cpu()
if options.get("coordinator"):
    from common.parallel import initialize
    initialize(options["coordinator"], options["processes"], options["process_id"])
from p2g.data import Vocab, encode_pairs, read_tsv
from p2g.train import Trainer
pairs = read_tsv(options["train"])[: 1024 if options["quick"] else None]
src, tgt = Vocab.build(p.phonemes for p in pairs), Vocab.build(p.spelling for p in pairs)
data = encode_pairs(pairs, src, tgt)
trainer = Trainer(len(src), len(tgt), attention=options["attention"], impl="xla_cpu", devices=jax.devices())
trainer.wait_each_step = trainer.wait_each_step or options.get("wait", False)
state, times = trainer.init_state(), []
for epoch in range(1 + options["rounds"]):
    tick = time.perf_counter()
    state, loss = trainer.train_epoch(state, data, epoch)
    times.append(time.perf_counter() - tick)
if jax.process_index() == 0:
    print(json.dumps({"seconds": min(times[1:]), "first": times[0], "loss": loss}))
"""


def probe(**options) -> dict:
    """Run :data:`PROBE` in one process, or in ``options['processes']`` joined ones."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    count = options.get("processes", 1)
    if count > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            options["coordinator"] = f"127.0.0.1:{s.getsockname()[1]}"
    procs = []
    for i in range(count):
        mine = dict(options, process_id=i)
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(mine)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [proc.communicate(timeout=1800) for proc in procs]
    if any(proc.returncode for proc in procs):
        err = next(e for proc, (_, e) in zip(procs, results) if proc.returncode)
        return {"error": (err.strip().splitlines() or ["failed"])[-1]}
    return json.loads(results[0][0].strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs after the compiling one (default: 3)")
    parser.add_argument("--attention", action="store_true", help="the Bahdanau-attention model (default: without)")
    parser.add_argument("--quick", action="store_true", help="1,024 words, one timed epoch (a smoke test)")
    parser.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "p2g" / "train.tsv"))
    args = parser.parse_args(argv)
    common = dict(train=args.train, attention=args.attention, rounds=1 if args.quick else args.rounds, quick=args.quick)
    rows = [
        ("1 device, every core (default)", probe(**common)),
        ("1 device, pinned to one core", probe(cores=[0], **common)),
        ("1 device, host waits for each step", probe(wait=True, **common)),
        ("2 host devices in one process (waits for each step)", probe(devices=2, **common)),
        ("2 processes x 1 device, gloo", probe(processes=2, **common)),
    ]
    print(f"{os.cpu_count()} CPU(s); P2G {'with' if args.attention else 'without'} attention, one epoch "
          f"(best of {common['rounds']})")
    for label, result in rows:
        figure = f"{result['seconds']:6.2f} s" if "seconds" in result else f"error: {result['error']}"
        print(f"  {label:<56} {figure}")


if __name__ == "__main__":
    main()
