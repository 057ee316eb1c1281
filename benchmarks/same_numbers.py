"""The same numbers before and after a change of the training code: runs the same short trainings
with this tree and with an earlier checkout, and compares their metrics.json histories.

    git worktree add /tmp/before 8dde141
    python -m benchmarks.same_numbers --before /tmp/before [--train 1600]

Runs, for both implementations: a 2-epoch CNN BN run, a 2-epoch CNN baseline sweep of two
learning rates and a 2-epoch P2G attention run, on the first --train training images (and a
quarter as many validation and test images) of the Intel file and the homework's P2G split.
Prints each history's largest relative difference; the last line is one JSON object
``{"max_rel_diff": ..., "runs": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

COMMANDS = {
    "cnn_bn": ["experiments.cnn", "--batch-norm", "--lr", "0.01", "--epochs", "2"],
    "cnn_sweep": ["experiments.cnn", "--lr", "0.05", "0.01", "--epochs", "2"],
    "p2g_attn": ["experiments.p2g", "train", "--attn", "--epochs", "2"],
}


def subset(npz: Path, train: int, out: Path) -> Path:
    """The first ``train`` training images and ``train // 4`` of validation and test, as an .npz."""
    with np.load(npz) as data:
        keep = {"train": train, "val": train // 4, "test": train // 4}
        np.savez(out, **{f"{split}_{kind}": data[f"{split}_{kind}"][:n] for split, n in keep.items()
                         for kind in ("images", "labels")})
    return out


def histories(metrics: dict) -> dict[str, list[dict]]:
    """Each run's per-epoch records without their wall time."""
    return {name: [{k: v for k, v in record.items() if k != "seconds"} for record in run["history"]]
            for name, run in metrics["runs"].items()}


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    if a.keys() != b.keys():
        return float("inf")
    for name in a:
        if len(a[name]) != len(b[name]):
            return float("inf")
        for x, y in zip(a[name], b[name]):
            if x.keys() != y.keys():
                return float("inf")
            for key in x:
                if x[key] is None or y[key] is None:
                    worst = max(worst, 0.0 if x[key] == y[key] else float("inf"))
                else:
                    worst = max(worst, abs(x[key] - y[key]) / max(abs(y[key]), 1e-12))
    return worst


def train(tree: Path, name: str, impl: str, data: Path, p2g_dir: Path, out: Path) -> dict:
    command = COMMANDS[name] + ["--impl", impl, "--quiet", "--out", str(out)]
    command += ["--data-dir", str(p2g_dir)] if name.startswith("p2g") else ["--data", str(data)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-m", *command], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return histories(json.loads((out / "metrics.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the earlier commit")
    parser.add_argument("--train", type=int, default=1600, help="training images of the CNN runs")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subset(SHARED / "intel" / "intel_landscapes_48.npz", args.train, tmp / "intel.npz")
        for name in COMMANDS:
            for impl in ("reference", "xla_cpu"):
                runs = [train(tree, name, impl, data, SHARED / "p2g", tmp / f"{label}-{name}-{impl}")
                        for label, tree in (("before", args.before.resolve()), ("after", ROOT))]
                results[f"{name}/{impl}"] = max_rel_diff(runs[1], runs[0])
                print(f"{name:<10} {impl:<9} max relative difference {results[f'{name}/{impl}']:.3g}", flush=True)
    print(json.dumps({"max_rel_diff": max(results.values()), "runs": results}))


if __name__ == "__main__":
    main()
