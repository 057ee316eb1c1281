"""XLA:CPU settings for the CNN, chosen by measurement (``python -m benchmarks.run``,
docs/performance.md): convolutions through oneDNN, and the YNNPACK library (jaxlib's default
for CPU convolutions and fusions) kept for plain dots only. On 2 cores this took the baseline
CNN's training step from 210 to 431 images/s at batch 8 and from 303 to 442 at batch 64.

XLA reads ``XLA_FLAGS`` once, when the first computation initialises the backend, so
:func:`tune_cpu` must run before any array is created. A flag the user already set in
``XLA_FLAGS`` wins over ours; ``HW2_XLA_DEFAULTS=1`` leaves XLA's defaults alone.
"""

from __future__ import annotations

import os

CPU_FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "--xla_cpu_use_onednn": "true",
}


def tune_cpu() -> list[str]:
    """Add :data:`CPU_FLAGS` to ``XLA_FLAGS`` (those not set there already); returns the flags added."""
    if os.environ.get("HW2_XLA_DEFAULTS") == "1":
        return []
    current = os.environ.get("XLA_FLAGS", "")
    present = {item.split("=", 1)[0] for item in current.split()}
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
