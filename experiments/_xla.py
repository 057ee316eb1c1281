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


def request_cpu_devices(n: int | None = None) -> None:
    """Ask XLA:CPU for host devices, each running its programs on a thread of its own, so that
    :class:`p2g.train.Trainer` can run shards of a batch at once (docs/performance.md): ``n``, and
    at least 2 where the machine has 2 cores (the default split). Only possible before the first
    computation; after it this changes nothing and the devices already there are used. Costs
    nothing where a run uses one device, or an accelerator."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(n or 0, min(2, os.cpu_count() or 1)))
    except RuntimeError:  # the backend is up already
        pass


def data_parallel_devices(n: int | None) -> list:
    """``n`` devices to split each batch over, reusing devices cyclically where there are fewer
    (the shards then run in turn: slower, same numbers). ``None``: 2 on a CPU with two host
    devices (:func:`request_cpu_devices`), else 1 (one accelerator, or one CPU device)."""
    import jax

    devices = jax.devices()
    if n is None:
        n = min(2, len(devices)) if devices[0].platform == "cpu" else 1
    return [devices[i % len(devices)] for i in range(n)]
