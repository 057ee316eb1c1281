"""The size of the training plumbing, as issue "One config, one training loop, one checkpoint
manager" measures it:

    python -m benchmarks.code_size

Prints the lines of experiments/ without the Hopfield demo CLI, every function there over 40
lines, each command's ``main`` length, and how many train-state classes, step loops
(``run_epoch``) and epoch loops (``fit``) the repository defines; the last line is one JSON object.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cnn", "p2g", "hopfield", "common", "experiments")


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def main() -> None:
    files = sorted(p for p in (ROOT / "experiments").glob("*.py") if p.name != "hopfield.py")
    lines = sum(len(p.read_text().splitlines()) for p in files)
    long = {f"{p.name}:{name}": n for p in files for name, n in functions(p) if n > 40}
    mains = {p.name: n for p in files for name, n in functions(p) if name == "main"}
    sources = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    defined = {"TrainState": 0, "run_epoch": 0, "fit": 0}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in defined and \
                    not (isinstance(node, ast.FunctionDef) and node.name == "run_epoch" and path.name == "train.py"):
                defined[node.name] += 1
    print(f"experiments/ without hopfield.py: {lines} lines in {len(files)} files")
    print(f"functions over 40 lines: {long or 'none'}")
    print(f"main: {mains}")
    print(f"definitions: {defined} (run_epoch: common/training.py; a part's train.py may wrap it)")
    print(json.dumps({"experiments_lines": lines, "functions_over_40": long, "main_lines": mains, "definitions": defined}))


if __name__ == "__main__":
    main()
