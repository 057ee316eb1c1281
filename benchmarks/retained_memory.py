"""Page faults of a large buffer freed and allocated again from a worker thread (as XLA:CPU's
threads do), with and without ``common.xla_cpu.retain_freed_memory``: a measurement of the
xla_cpu implementation's allocator setting, printed, not a test (it depends on the C library).

    python -m benchmarks.retained_memory

Each mode runs in a fresh process, since the setting is process-wide. Prints, per mode, whether the
setting was applied and the largest minor-fault count of a reallocation; the last line is one JSON
object. Expected on glibc: "retain" and "cnn-64" a few faults, "default" and "cnn-8" about 24,576
(every page of the 96 MiB buffer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FRESH_BUFFER_FAULTS = """
import resource, sys, threading
import numpy as np
from common.xla_cpu import cnn_retains_memory, retain_freed_memory
mode = sys.argv[1]
took = retain_freed_memory() if mode == "retain" else cnn_retains_memory(int(mode[4:])) if mode.startswith("cnn-") else None
getattr(np._core.multiarray, "_set_madvise_hugepage", lambda on: None)(False)  # 4 KiB pages, as XLA's buffers
faults = []

def fresh_buffer():  # a 96 MiB buffer written (every page touched) and freed, from a worker thread
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(96 * 2**20 // 8)
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(3):
    worker = threading.Thread(target=fresh_buffer)
    worker.start()
    worker.join()
print(took, max(faults[1:]))
"""


def faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FRESH_BUFFER_FAULTS, mode], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HW2_XLA_DEFAULTS": ""})
    took, count = out.stdout.split()
    return took == "True", int(count)


def main() -> None:
    results = {}
    for mode in ("retain", "default", "cnn-64", "cnn-8"):
        took, count = faults(mode)
        results[mode] = {"applied": took, "faults": count}
        print(f"{mode:<8} applied {str(took):<5} page faults {count:>7,}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
