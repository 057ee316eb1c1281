"""Which implementation a command runs (``--impl``), and the XLA:CPU settings that go with the
``xla_cpu`` one.

XLA:CPU settings for the CNN, chosen by measurement (``python -m benchmarks.run``, the decisions
table of docs/performance.md): the YNNPACK library (jaxlib's default for CPU convolutions and
fusions) kept for plain dots and reductions, so that XLA runs the convolutions itself.
:func:`retain_freed_memory` keeps the C allocator from handing large freed buffers back to the
kernel, which otherwise maps them afresh (and page-faults them in) on every training step; only
the CNN's tool applies it, and only where a step has such buffers (:func:`cnn_retains_memory`).

XLA reads ``XLA_FLAGS`` once, when the first computation initialises the backend, so
:func:`tune_cpu` must run before any array is created. A flag the user already set in
``XLA_FLAGS`` wins over ours; ``HW2_XLA_DEFAULTS=1`` leaves XLA's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CPU_FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
# Not set: --xla_cpu_use_onednn=true, which compiles the CNN's steps to the same program (docs/performance.md).


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


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel: one arena,
    no ``mmap``-ed blocks, no trimming of the heap. Returns whether the settings took.

    Why: XLA:CPU allocates each step's buffers afresh, and glibc serves a request above its mmap
    threshold from a worker thread with a fresh ``mmap`` that it unmaps on free, so every step
    page-faults those buffers in again. With one arena and ``mmap`` off they come from the heap and
    stay there. The process keeps its peak heap until it exits. Must run before the first
    computation (the XLA threads pick their arena on their first allocation). No-op away from
    glibc, and with ``HW2_XLA_DEFAULTS=1``."""
    if os.environ.get("HW2_XLA_DEFAULTS") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


# glibc maps a request above its largest dynamic mmap threshold (32 MiB) afresh each time, and a
# thread's arena cannot serve one above 64 MiB; the CNN step's largest buffers grow with the
# images it holds, about 1.25 MB an image (two of about 80 MB at batch 64).
RETAIN_FROM_IMAGES = 32


def cnn_retains_memory(images_per_step: int) -> bool:
    """Apply :func:`retain_freed_memory` for a CNN training step over ``images_per_step`` images
    (the batch size, times the models of a vmapped sweep), where it pays: from
    :data:`RETAIN_FROM_IMAGES` images on; below that the single arena costs more than the page
    faults it saves (docs/performance.md). Returns whether the setting was applied."""
    return images_per_step >= RETAIN_FROM_IMAGES and retain_freed_memory()


IMPL_CHOICES = ("auto", "reference", "xla_cpu")


def _cpu_only() -> bool:
    """Whether jax can only run on the CPU here, found without starting a backend: ``JAX_PLATFORMS``
    names only ``cpu``, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    import importlib.util

    platforms = [p for p in os.environ.get("JAX_PLATFORMS", "").lower().split(",") if p]
    if platforms:
        return platforms == ["cpu"]
    return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def choose_impl(requested: str, log=print) -> str:
    """Resolve ``--impl``: ``auto`` is ``xla_cpu`` on a CPU backend and ``reference`` on an
    accelerator. Starts no backend where jax can only run on the CPU, so that the caller can still
    apply the XLA:CPU settings (:func:`tune_cpu`) afterwards. Logs the choice in one line; raises
    ``ValueError`` for an unknown name."""
    if requested not in IMPL_CHOICES:
        raise ValueError(f"unknown implementation {requested!r}; expected one of {IMPL_CHOICES}")
    cpu_only = _cpu_only()
    if requested != "auto":
        impl = requested
    else:
        import jax

        impl = "xla_cpu" if cpu_only or jax.default_backend() == "cpu" else "reference"
        # An accelerator plugin that found no accelerator: too late for the XLA:CPU flags (read at start-up).
    log(f"implementation: {impl}" + (" (--impl auto)" if requested == "auto" else ""))
    return impl
