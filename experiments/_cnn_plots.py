"""PNG figures of a CNN run: training loss and validation accuracy per epoch, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments._plots import pyplot


def diverged_at(history: list[dict], key: str = "train_loss") -> int | None:
    """The first epoch whose ``key`` is missing or not finite (a diverged run), else None."""
    return next((h["epoch"] for h in history if h[key] is None or not np.isfinite(h[key])), None)


def plot_curves(runs: dict[str, list[dict]], out: Path, title: str) -> list[Path]:
    """``runs``: label -> per-epoch dicts with ``train_loss`` and ``val_acc``; one figure each."""
    plt = pyplot()
    written = []
    for key, ylabel, name in (
        ("train_loss", "training loss (NLL)", "training_loss.png"),
        ("val_acc", "validation accuracy", "val_accuracy.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, history in runs.items():
            epochs = [h["epoch"] for h in history]
            values = [h[key] if h[key] is not None and np.isfinite(h[key]) else np.nan for h in history]
            diverged = diverged_at(history)
            if diverged is not None:  # a run that diverged: an x at its epoch, on the axis, and said in the legend
                label = f"{label} (diverged at epoch {diverged})"
            (line,) = ax.plot(epochs, values, marker="o", ms=2.5, label=label)
            if diverged is not None:
                ax.plot([diverged], [0.0], marker="x", ms=9, mew=2, color=line.get_color(), linestyle="none",
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if key == "train_loss":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


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
