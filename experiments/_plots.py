"""The training commands' figures (PNG, matplotlib's file-only Agg backend): per-epoch curves of
one or more runs, and a confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def diverged_at(history: list[dict], key: str = "train_loss") -> int | None:
    """The first epoch whose ``key`` is missing or not finite (a diverged run), else None."""
    return next((h["epoch"] for h in history if h[key] is None or not np.isfinite(h[key])), None)


def plot_curves(curves: dict[str, tuple[list[dict], str]], path: Path, ylabel: str, title: str, log: bool = False) -> Path:
    """One figure at ``path``: for each label, ``(history, key)``: the per-epoch records' ``key``
    against their epoch; a run that diverged gets an x on the axis at that epoch, and says so in
    the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, (history, key) in curves.items():
        values = [h[key] if h[key] is not None and np.isfinite(h[key]) else np.nan for h in history]
        diverged = diverged_at(history)
        (line,) = ax.plot([h["epoch"] for h in history], values, marker="o", ms=2.5,
                          label=label if diverged is None else f"{label} (diverged at epoch {diverged})")
        if diverged is not None:
            ax.plot([diverged], [0.0], marker="x", ms=9, mew=2, color=line.get_color(), linestyle="none",
                    transform=ax.get_xaxis_transform(), clip_on=False)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title, yscale="log" if log else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(counts: np.ndarray, class_names, out: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5))
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = out / "confusion_matrix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
