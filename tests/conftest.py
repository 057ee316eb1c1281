"""Shared fixtures: float64 for the math tests, paths to the shared data when present."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

# The tests run under XLA's default settings (common.xla_cpu.tune_cpu is the CLIs' choice for
# the xla_cpu implementation, tested on its own), with two XLA host devices for the data-parallel tests.
jax.config.update("jax_num_cpu_devices", 2)

# One persistent compilation cache for the command lines the session starts (JAX reads the
# variables at start-up): their many runs of the same small models compile once. Not for this
# process, where writing the cache costs more than it saves.
_CACHE = tempfile.TemporaryDirectory(prefix="jax-cache-")
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE.name, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats, restoring the default afterwards."""
    with jax.enable_x64(True):
        yield


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` as a user would, from the repository root; capture its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Runs ``python -m MODULE ARGS`` with orbax saves patched to SIGKILL the process at the AT-th save
# of the run, just "before" it, "while" orbax writes it, or "after" it is on disk, or to fail it as
# a full disk does ("disk-full")
# (argv: AT WHERE MODULE ARGS...).
KILL_AT_SAVE = """
import os, runpy, signal, sys
from common import checkpoint as _checkpoint
at, where, module = int(sys.argv[1]), sys.argv[2], sys.argv[3]
count, save = [0], _checkpoint.Checkpoints.save
def killing_save(self, *args, **kwargs):
    count[0] += 1
    if count[0] == at and where == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if count[0] == at and where == "disk-full":
        raise OSError(28, "No space left on device", str(self.directory))
    save(self, *args, **kwargs)
    if count[0] == at and where in ("after", "while"):
        if where == "after":  # once the step is on disk (saves are asynchronous)
            self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
_checkpoint.Checkpoints.save = killing_save
sys.argv = [module] + sys.argv[4:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_killed_at_save(at: int, where: str, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` killed (SIGKILL) at its ``at``-th checkpoint save, ``where`` being
    "before" that save, "while" it is written, or "after" it, or with that save failing for a full
    disk ("disk-full")."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", KILL_AT_SAVE, str(at), where, module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def kill_at_saves_then_finish(kills, module: str, *args: str) -> None:
    """Run ``python -m module args`` killed at each (save number, "before"/"while"/"after") of ``kills`` in
    turn, each time rerunning the same command, until a run ends on its own; at least three must
    have been killed. Then the same command once more, which must succeed."""
    killed = 0
    for at, where in kills:
        proc = run_killed_at_save(at, where, module, *args)
        assert proc.returncode in (-9, 0), proc.stderr  # 0: the run ended before that save
        killed += proc.returncode == -9
        if proc.returncode == 0:
            break
    assert killed >= 3
    proc = run_cli(module, *args)
    assert proc.returncode == 0, proc.stderr


def assert_plot(path: Path, min_width: int = 300, min_height: int = 200) -> None:
    """``path`` is a PNG of at least that many pixels that draws something: more than a handful of
    colours, its pixels not all alike (a blank or failed figure is one colour)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", path
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert width >= min_width and height >= min_height, (path, image.size)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8 and pixels.std() > 5, path


def slow(*values):
    """A parametrize case run only with --runslow: a variant of a property that a faster case of
    the same test checks in the default run."""
    return pytest.param(*values, marks=pytest.mark.slow)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (what CI runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: command-line, subprocess, benchmark and long tests; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
