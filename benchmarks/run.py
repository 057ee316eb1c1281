"""This project (JAX) against PyTorch reference implementations, side by side on one machine.

    python -m benchmarks.run [--quick] [--rounds 5] [--only cnn p2g ...]

Each group of rows (cnn, p2g, hopfield) runs in a fresh process of its own (:mod:`benchmarks.rows`;
the CNN's in one per batch size, 8 and 64), and the CNN and P2G training rows once more for the
implementation that ``--impl auto`` does not pick here (rows named ``..._reference`` on a CPU,
``..._xla_cpu`` on an accelerator), so that the cost or gain of each kernel set shows in one run;
set up as its command-line tool sets itself up (:func:`benchmarks.rows.setup_process`; both
sides run under those settings), with a float32 matmul that measures the machine's peak; this
process only starts them and prints the table, and imports neither jax nor torch. Each row times
the same work in both (our real training/decoding code paths against :mod:`benchmarks.torch_ref`),
interleaved: a first call (compilation, reported apart), a warm-up call, then ``--rounds`` rounds
alternating which goes first; the median is reported. Prints one table, then a final line holding
one JSON object: row -> {"ours", "torch", "ratio"}, values in the row's unit, ratio > 1 meaning
ours is faster. "%peak" is ours' model FLOP rate (counted analytically in :mod:`benchmarks.rows`)
over the machine's peak measured in the same run (the faster of a jitted and a torch float32
matmul, the best over the processes). ``--quick`` (tiny sizes, one round) is a smoke test for CI;
its figures mean nothing. Without PyTorch installed (``pip install -e ".[bench]"``) only our
side is timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GROUPS = ("cnn", "p2g", "hopfield")
# the processes of each group (each also times the matmul peak first); the CNN's tool sets the C
# allocator up by batch size (common.xla_cpu.cnn_retains_memory), so each batch size has its own;
# "@alt": the implementation --impl auto does not pick here
PROCESSES = {"cnn": ("cnn-b8", "cnn-b64", "cnn-b8@alt", "cnn-b64@alt"), "p2g": ("p2g", "p2g@alt"), "hopfield": ("hopfield",)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test, not a measurement")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row (median reported)")
    parser.add_argument("--p2g-rounds", type=int, default=3, help="timed rounds for the P2G epoch rows")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="row groups to run")
    parser.add_argument("--xla-defaults", action="store_true",
                        help="leave XLA's CPU defaults and the C allocator alone for the CNN rows "
                             "(otherwise the settings of common/xla_cpu.py, as experiments.cnn)")
    parser.add_argument("--p2g-devices", type=int, metavar="N",
                        help="devices a P2G training batch is split over (default: as experiments.p2g: 1 on a CPU)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.p2g_rounds < 1 or (args.p2g_devices is not None and args.p2g_devices < 1):
        parser.error("--rounds, --p2g-rounds and --p2g-devices must be at least 1")
    options = json.dumps(vars(args))
    processes = [p for g in GROUPS if g in args.only for p in PROCESSES[g]]
    print(f"each group in a process of its own, set up as its command-line tool: {', '.join(processes)}"
          f"{'; --quick: figures mean nothing' if args.quick else ''}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for process in processes:
            out = Path(tmp, f"{process}.json")
            child = subprocess.Popen([sys.executable, "-m", "benchmarks.rows", process, str(out), options],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
            for line in child.stdout:  # relayed, so that progress shows and callers capturing stdout see it
                print(line, end="", flush=True)
            if child.wait() != 0:
                print(f"error: the {process} rows failed (exit status {child.returncode})", file=sys.stderr)
                return 1
            runs.append(json.loads(out.read_text()))

    # one matmul row (the fastest process's) and every group's own rows, %peak against that peak
    best = max(runs, key=lambda run: run["peak"])
    peak = best["peak"]
    rows = [r for r in best["rows"] if r["group"] == "matmul"] + [r for run in runs for r in run["rows"] if r["group"] != "matmul"]
    peaks = ", ".join(f"{run['peak'] / 1e9:.0f}" for run in runs)
    print(f"\npeak: {peak / 1e9:.1f} GFLOP/s (float32 matmul, the faster of jax and torch; the best of "
          f"{len(runs)} process(es): {peaks})")
    header = f"{'row':<28} {'unit':<10} {'ours':>10} {'torch':>10} {'ratio':>7} {'%peak':>6} {'1st call s':>10}  note"
    print(header + "\n" + "-" * len(header))
    fmt = lambda v: "n/a" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")
    summary = {}
    for r in rows:
        frac = "" if r["flop_rate"] is None else f"{100 * r['flop_rate'] / peak:5.1f}%"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['name']:<28} {r['unit']:<10} {fmt(r['ours']):>10} {fmt(r['torch']):>10} "
              f"{ratio:>7} {frac:>6} {r['first_call_s']:>10.1f}  {r['note']}")
        summary[r["name"]] = {"ours": round(r["ours"], 4), "torch": None if r["torch"] is None else round(r["torch"], 4),
                              "ratio": None if r["ratio"] is None else round(r["ratio"], 3)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
