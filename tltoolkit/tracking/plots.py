"""Pictures for MLflow: training curves and confusion matrices (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def curves_figure(history: pd.DataFrame, title: str = "") -> plt.Figure:
    """Loss and accuracy per epoch, train and validation; stages (a `stage` column) are marked and shaded.

    Args:
        history: One row per epoch with `loss`, `accuracy`, `val_loss`, `val_accuracy` and optionally `stage`.
        title: Figure title.
    """
    history = history.reset_index(drop=True)
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-o"), (f"val_{metric}", "-s")):
            if key in history:
                ax.plot(x, history[key], style, markersize=3, label=key)
        if "stage" in history:
            starts = history.index[history["stage"] != history["stage"].shift()].tolist()
            for i, start in enumerate(starts):
                end = starts[i + 1] if i + 1 < len(starts) else len(history)
                if i % 2:
                    ax.axvspan(start + 0.5, end + 0.5, color="0.93", zorder=0)
                ax.text(start + 0.6, 1.0, history["stage"][start], transform=ax.get_xaxis_transform(), va="top")
        ax.set_xlim(0.5, len(history) + 0.5)  # Also keeps stage labels inside the axes for one-epoch stages.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str = "") -> plt.Figure:
    """A confusion matrix with counts, true classes as rows."""
    size = max(4.0, 0.45 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if len(class_names) > 4 else "horizontal"
    )
    ax.set_title(title)
    return fig
