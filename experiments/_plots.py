"""matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
